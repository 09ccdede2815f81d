//! kiln: a portable trainer for the Llama 2 recipe on Burn.
//!
//! The pieces, in the order a run uses them: [`config`] (TOML sections with the paper's
//! defaults), [`device`] (GPU through wgpu, CUDA, or the CPU), [`tokenizer`] and [`data`]
//! (text to packed token sequences), [`model`] (the Llama architecture, built on [`kernels`]: fused WGSL kernels
//! on wgpu, the plain Burn [`ops`] elsewhere),
//! [`optim`] (AdamW, clipping, schedule), [`checkpoint`] and [`params`] (state on disk),
//! [`trainer`] (the loop every stage shares), [`pretrain`] and [`sft`] (the recipes, with
//! [`chat`]: data formats and chat templates), [`generate`] (sampling), [`metrics`] and
//! [`plot`].

pub mod bench;
pub mod chat;
pub mod chat_session;
pub mod checkpoint;
pub mod config;
pub mod convert;
pub mod data;
pub mod device;
pub mod gatt;
pub mod generate;
pub mod gguf;
pub mod gym;
pub mod hf;
pub mod kernels;
pub mod metrics;
pub mod model;
pub mod ops;
pub mod optim;
pub mod params;
pub mod plot;
pub mod pretrain;
pub mod progress;
pub mod reward;
pub mod sft;
pub mod tokenizer;
pub mod trainer;
