//! Text in: corpora packed into token windows, the tokenizer, and chat data (JSONL formats and
//! templates).

pub mod chat;
pub mod corpus;
pub mod tokenizer;
