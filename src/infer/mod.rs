//! Running a trained model: batched sampling with the KV cache, the interactive chat, and
//! scoring with a reward model.

pub mod chat_session;
pub mod combined_reward;
pub mod generate;
pub mod score;
