//! Text files -> token stream -> fixed-length packed sequences, with a held-out validation
//! split and a deterministic, resumable shuffle.

use std::path::{Path, PathBuf};

use anyhow::{Result, anyhow, bail};
use rand::SeedableRng;
use rand::seq::SliceRandom;
use rand_chacha::ChaCha8Rng;
use serde::{Deserialize, Serialize};

use crate::data::tokenizer::Tokenizer;

/// One text file of the corpus.
pub struct Document {
    pub path: PathBuf,
    pub text: String,
}

/// Reads every file named, or every `*.txt` in a named directory (sorted), as UTF-8.
pub fn read_corpus(paths: &[PathBuf]) -> Result<Vec<Document>> {
    let mut files = Vec::new();
    for path in paths {
        if path.is_dir() {
            let mut inside: Vec<PathBuf> = std::fs::read_dir(path)
                .map_err(|e| anyhow!("cannot read corpus directory {}: {e}", path.display()))?
                .filter_map(|entry| entry.ok().map(|e| e.path()))
                .filter(|p| p.is_file() && p.extension().is_some_and(|e| e == "txt"))
                .collect();
            if inside.is_empty() {
                bail!("corpus directory {} has no .txt files", path.display());
            }
            inside.sort();
            files.extend(inside);
        } else if path.is_file() {
            files.push(path.clone());
        } else {
            bail!("corpus file {} not found", path.display());
        }
    }
    files
        .into_iter()
        .map(|path| {
            let text = read_utf8(&path)?;
            if text.trim().is_empty() {
                bail!("corpus file {} is empty", path.display());
            }
            Ok(Document { path, text })
        })
        .collect()
}

/// Reads a file as UTF-8, naming the line of the first invalid byte.
pub fn read_utf8(path: &Path) -> Result<String> {
    let bytes = std::fs::read(path).map_err(|e| anyhow!("cannot read {}: {e}", path.display()))?;
    String::from_utf8(bytes).map_err(|e| {
        let valid = e.utf8_error().valid_up_to();
        let line = 1 + e.as_bytes()[..valid]
            .iter()
            .filter(|&&b| b == b'\n')
            .count();
        anyhow!(
            "{}:{line}: not valid UTF-8 (byte offset {valid})",
            path.display()
        )
    })
}

/// Token streams of the training and validation splits. Each document contributes its head to
/// training and its tail (`val_fraction` of its tokens) to validation, so validation covers
/// every document; documents are framed by BOS ... EOS.
pub struct TokenSplits {
    pub train: Vec<u32>,
    pub val: Vec<u32>,
}

pub fn tokenize_corpus(
    documents: &[Document],
    tokenizer: &Tokenizer,
    val_fraction: f64,
) -> Result<TokenSplits> {
    let mut splits = TokenSplits {
        train: Vec::new(),
        val: Vec::new(),
    };
    for doc in documents {
        let mut ids = vec![tokenizer.bos_id];
        ids.extend(tokenizer.encode(&doc.text)?);
        ids.push(tokenizer.eos_id);
        let n_val = ((ids.len() as f64) * val_fraction).round() as usize;
        let (train, val) = ids.split_at(ids.len() - n_val);
        splits.train.extend_from_slice(train);
        splits.val.extend_from_slice(val);
    }
    Ok(splits)
}

/// A token stream cut into windows of `seq_len + 1` tokens (inputs and shifted targets);
/// consecutive windows share one token, so every token is a target exactly once.
pub struct PackedSequences {
    tokens: Vec<u32>,
    seq_len: usize,
}

impl PackedSequences {
    pub fn new(tokens: Vec<u32>, seq_len: usize) -> Self {
        Self { tokens, seq_len }
    }

    pub fn len(&self) -> usize {
        self.tokens.len().saturating_sub(1) / self.seq_len
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    pub fn seq_len(&self) -> usize {
        self.seq_len
    }

    pub fn window(&self, index: usize) -> &[u32] {
        let start = index * self.seq_len;
        &self.tokens[start..start + self.seq_len + 1]
    }

    /// Inputs and targets of the windows `indices`, row-major `[indices.len(), seq_len]`.
    pub fn batch(&self, indices: &[usize]) -> Batch {
        let mut batch = Batch {
            inputs: Vec::with_capacity(indices.len() * self.seq_len),
            targets: Vec::with_capacity(indices.len() * self.seq_len),
            batch_size: indices.len(),
            seq_len: self.seq_len,
        };
        for &i in indices {
            let w = self.window(i);
            batch
                .inputs
                .extend(w[..self.seq_len].iter().map(|&t| t as i64));
            batch.targets.extend(w[1..].iter().map(|&t| t as i64));
        }
        batch
    }
}

pub struct Batch {
    pub inputs: Vec<i64>,
    pub targets: Vec<i64>,
    pub batch_size: usize,
    pub seq_len: usize,
}

/// Where the training data stream stands: saved in checkpoints for exact resume.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct DataCursor {
    pub epoch: u64,
    /// Next position in the epoch's permutation.
    pub position: usize,
}

/// Serves the indices of training examples in batches, in an order that depends only on
/// (seed, epoch), so a cursor is all the state a resumed run needs.
pub struct ShuffledIndices {
    len: usize,
    seed: u64,
    cursor: DataCursor,
    order: Vec<usize>,
}

impl ShuffledIndices {
    pub fn new(len: usize, seed: u64, cursor: DataCursor) -> Self {
        let order = epoch_order(len, seed, cursor.epoch);
        Self {
            len,
            seed,
            cursor,
            order,
        }
    }

    pub fn cursor(&self) -> DataCursor {
        self.cursor
    }

    pub fn next_batch(&mut self, batch_size: usize) -> Vec<usize> {
        let mut indices = Vec::with_capacity(batch_size);
        while indices.len() < batch_size {
            if self.cursor.position == self.order.len() {
                self.cursor = DataCursor {
                    epoch: self.cursor.epoch + 1,
                    position: 0,
                };
                self.order = epoch_order(self.len, self.seed, self.cursor.epoch);
            }
            indices.push(self.order[self.cursor.position]);
            self.cursor.position += 1;
        }
        indices
    }
}

fn epoch_order(n: usize, seed: u64, epoch: u64) -> Vec<usize> {
    let mut order: Vec<usize> = (0..n).collect();
    let mut rng = ChaCha8Rng::seed_from_u64(seed ^ epoch.wrapping_mul(0x9E37_79B9_7F4A_7C15));
    order.shuffle(&mut rng);
    order
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn windows_cover_every_target_once_and_shuffle_resumes() {
        let tokens: Vec<u32> = (0..101).collect();
        let seqs = PackedSequences::new(tokens, 10);
        assert_eq!(seqs.len(), 10);
        let all: Vec<usize> = (0..10).collect();
        let b = seqs.batch(&all);
        let mut targets = b.targets.clone();
        targets.sort();
        assert_eq!(targets, (1..101).collect::<Vec<i64>>());

        let start = DataCursor {
            epoch: 0,
            position: 0,
        };
        let mut a = ShuffledIndices::new(10, 7, start);
        let first: Vec<Vec<usize>> = (0..7).map(|_| a.next_batch(3)).collect();
        // Resume from the cursor after 4 batches: the same remaining batches follow.
        let mut b = ShuffledIndices::new(10, 7, start);
        for _ in 0..4 {
            b.next_batch(3);
        }
        let mut c = ShuffledIndices::new(10, 7, b.cursor());
        for expected in &first[4..] {
            assert_eq!(&c.next_batch(3), expected);
        }
        // Epochs differ in order.
        assert_ne!(epoch_order(10, 7, 0), epoch_order(10, 7, 1));
    }

    #[test]
    fn non_utf8_is_reported_with_file_and_line() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("bad.txt");
        std::fs::write(&path, b"line one\nline two\nbad \xff byte\n").unwrap();
        let e = read_utf8(&path).unwrap_err().to_string();
        assert!(e.contains("bad.txt:3"), "{e}");
    }
}
