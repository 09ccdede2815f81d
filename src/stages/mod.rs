//! The recipe, one file per stage, in the order the Llama 2 paper runs them.

pub mod pretrain;
pub mod sft;
pub mod reward;
pub mod gatt;
