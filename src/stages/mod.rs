//! The recipe, one file per stage, in the order the Llama 2 paper runs them.

pub mod gatt;
pub mod pipeline;
pub mod ppo;
pub mod pretrain;
pub mod report;
pub mod reward;
pub mod rs;
pub mod sft;
