//! Running a trained model: batched sampling with the KV cache, and the interactive chat.

pub mod chat_session;
pub mod generate;
