//! Models on disk: kiln checkpoints, parameters by name, Hugging Face directories, GGUF files,
//! and the one loader that tells them apart.

pub mod checkpoint;
pub mod convert;
pub mod gguf;
pub mod gguf_write;
pub mod hf;
pub mod params;
