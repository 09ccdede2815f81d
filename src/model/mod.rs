//! The Llama 2 model in one file: pre-norm decoder blocks with RMSNorm, grouped-query attention
//! with rotary embeddings, a SwiGLU feed-forward network, no biases.
//!
//! Struct fields are named after the Hugging Face Llama weights, so a parameter's path
//! (`model.layers.0.self_attn.q_proj.weight`) is its name in a HF `model.safetensors`, and
//! linear weights are stored `[out_features, in_features]` as there.

pub mod actions;
pub mod ops;
pub mod reward;

use burn::module::{Module, Param};
use burn::tensor::{Device, Int, Tensor, TensorData};
use rand::SeedableRng;
use rand_chacha::ChaCha8Rng;
use rand_distr::{Distribution, Normal};

use crate::config::ModelConfig;
use crate::kernels::{self, Kernels, PreparedLayout, SequenceLayout};
use crate::model::ops::RopeTables;

#[derive(Module, Debug)]
pub struct Linear {
    /// `[out_features, in_features]`.
    pub weight: Param<Tensor<2>>,
}

impl Linear {
    pub fn forward<const D: usize>(&self, x: Tensor<D>) -> Tensor<D> {
        let dims = x.dims();
        let rows: usize = dims[..D - 1].iter().product();
        let [out_features, in_features] = self.weight.dims();
        // One 2-D product over all rows (kernels::linear: a matmul with the transpose as a
        // stride swap, or on the CPU for few rows a kernel that reads the weight in place).
        let y = kernels::linear(x.reshape([rows, in_features]), self.weight.val());
        let mut out = dims;
        out[D - 1] = out_features;
        y.reshape(out)
    }
}

#[derive(Module, Debug)]
pub struct RmsNorm {
    pub weight: Param<Tensor<1>>,
    pub eps: f64,
}

impl RmsNorm {
    pub fn forward<const D: usize>(&self, x: Tensor<D>, kernels: Kernels) -> Tensor<D> {
        kernels::rms_norm(x, self.weight.val(), self.eps, kernels)
    }
}

#[derive(Module, Debug)]
pub struct Embedding {
    /// `[vocab_size, dim]`.
    pub weight: Param<Tensor<2>>,
}

#[derive(Module, Debug)]
pub struct Attention {
    pub q_proj: Linear,
    pub k_proj: Linear,
    pub v_proj: Linear,
    pub o_proj: Linear,
    pub n_heads: usize,
    pub n_kv_heads: usize,
}

impl Attention {
    /// `x`: `[batch, seq, dim]`. With a cache, the new keys and values are appended to it and
    /// the queries attend to everything cached before them.
    fn forward(
        &self,
        x: Tensor<3>,
        layout: &PreparedLayout,
        cache: Option<(&mut LayerCache, usize)>,
    ) -> Tensor<3> {
        let [b, t, dim] = x.dims();
        let head_dim = dim / self.n_heads;
        // Token-major heads, [batch, seq, heads, head_dim]: a reshape, no copy.
        let heads = |y: Tensor<3>, n: usize| y.reshape([b, t, n, head_dim]);
        let q = heads(self.q_proj.forward(x.clone()), self.n_heads);
        let k = heads(self.k_proj.forward(x.clone()), self.n_kv_heads);
        let v = heads(self.v_proj.forward(x), self.n_kv_heads);
        let q = layout.rope(q);
        let k = layout.rope(k);
        let (k, v) = match cache {
            Some((cache, cached)) => cache.append(cached, k, v),
            None => (k, v),
        };
        let out = layout.attention(q, k, v);
        self.o_proj.forward(out.reshape([b, t, dim]))
    }
}

#[derive(Module, Debug)]
pub struct Mlp {
    pub gate_proj: Linear,
    pub up_proj: Linear,
    pub down_proj: Linear,
}

impl Mlp {
    fn forward(&self, x: Tensor<3>, kernels: Kernels) -> Tensor<3> {
        let hidden = kernels::swiglu(
            self.gate_proj.forward(x.clone()),
            self.up_proj.forward(x),
            kernels,
        );
        self.down_proj.forward(hidden)
    }
}

#[derive(Module, Debug)]
pub struct DecoderLayer {
    pub self_attn: Attention,
    pub mlp: Mlp,
    pub input_layernorm: RmsNorm,
    pub post_attention_layernorm: RmsNorm,
}

#[derive(Module, Debug)]
pub struct Decoder {
    pub embed_tokens: Embedding,
    pub layers: Vec<DecoderLayer>,
    pub norm: RmsNorm,
}

#[derive(Module, Debug)]
pub struct Llama {
    pub model: Decoder,
    /// `None` when the output projection shares the input embedding.
    pub lm_head: Option<Linear>,
    #[module(skip)]
    pub config: ModelConfig,
    #[module(skip)]
    rope: RopeTables,
    /// Custom WGSL kernels or the reference ops, resolved from `config.kernels` and the device.
    #[module(skip)]
    kernels: Kernels,
}

/// Positions a layer's cache buffer grows by when it is full.
const CACHE_BLOCK: usize = 64;

/// Keys and values of one layer: buffers `[batch, capacity, kv_heads, head_dim]` whose first
/// positions (as many as the [`KvCache`] holds) are filled. A new token is written into the
/// room after them, in place when nothing else holds the buffer, so a decoding step copies only
/// its own keys, not the whole cache; the buffers grow by [`CACHE_BLOCK`] positions when full.
#[derive(Clone, Debug, Default)]
pub struct LayerCache {
    buffers: Option<(Tensor<4>, Tensor<4>)>,
}

impl LayerCache {
    /// Appends `k` and `v` (`[batch, new, kv_heads, head_dim]`) after the first `start`
    /// positions and returns every key and value up to them, `[batch, start + new, kv_heads,
    /// head_dim]` views of the buffers.
    fn append(&mut self, start: usize, k: Tensor<4>, v: Tensor<4>) -> (Tensor<4>, Tensor<4>) {
        let [b, t, h, d] = k.dims();
        let end = start + t;
        let (keys, values) = match self.buffers.take() {
            Some((keys, values)) if end <= keys.dims()[1] => {
                let place = [0..b, start..end, 0..h, 0..d];
                (
                    keys.slice_assign(place.clone(), k),
                    values.slice_assign(place, v),
                )
            }
            buffers => {
                let room = (end + CACHE_BLOCK).next_multiple_of(CACHE_BLOCK) - end;
                let grow = |old: Option<Tensor<4>>, new: Tensor<4>| {
                    let zeros = Tensor::zeros([b, room, h, d], &new.device());
                    let mut parts: Vec<Tensor<4>> = old
                        .map(|old| old.slice([0..b, 0..start, 0..h, 0..d]))
                        .into_iter()
                        .collect();
                    parts.extend([new, zeros]);
                    Tensor::cat(parts, 1)
                };
                let (old_k, old_v) = buffers.unzip();
                (grow(old_k, k), grow(old_v, v))
            }
        };
        let filled = [0..b, 0..end, 0..h, 0..d];
        let views = (
            keys.clone().slice(filled.clone()),
            values.clone().slice(filled),
        );
        self.buffers = Some((keys, values));
        views
    }
}

/// Cached keys and values of every layer, for generation one token at a time.
pub struct KvCache {
    layers: Vec<LayerCache>,
    len: usize,
    /// Left padding of each batch row: keys before this position are padding.
    left_pad: Vec<usize>,
}

impl KvCache {
    pub fn new(n_layers: usize, left_pad: Vec<usize>) -> Self {
        Self {
            layers: vec![LayerCache::default(); n_layers],
            len: 0,
            left_pad,
        }
    }

    pub fn len(&self) -> usize {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Keeps only the first `len` positions: the part of a sequence that a new one shares
    /// (a chat's earlier turns), so that only what differs is computed again.
    pub fn truncate(&mut self, len: usize) {
        assert!(len <= self.len, "cannot grow a cache by truncating it");
        // The buffers stay; the positions after `len` are overwritten by the next append.
        self.len = len;
    }

    /// The cache with its batch repeated `times` times (rows `0..b`, then `0..b` again, ...):
    /// continuations of one prefix computed once, as a reward model's chosen and rejected
    /// answers to one prompt.
    pub fn repeat(&self, times: usize) -> Self {
        let layers = self
            .layers
            .iter()
            .map(|layer| LayerCache {
                buffers: layer.buffers.as_ref().map(|(k, v)| {
                    (
                        Tensor::cat(vec![k.clone(); times], 0),
                        Tensor::cat(vec![v.clone(); times], 0),
                    )
                }),
            })
            .collect();
        Self {
            layers,
            len: self.len,
            left_pad: self.left_pad.repeat(times),
        }
    }
}

/// Parameter initialisation: N(0, init_std) for every matrix, ones for norm weights, drawn on
/// the host from a seeded generator so that every device starts from the same weights.
struct Init {
    rng: ChaCha8Rng,
    normal: Normal<f32>,
    device: Device,
    /// Zeros instead of random draws: for a model whose weights are loaded next.
    zeros: bool,
}

impl Init {
    fn matrix(&mut self, rows: usize, cols: usize) -> Param<Tensor<2>> {
        if self.zeros {
            return Param::from_tensor(Tensor::zeros([rows, cols], &self.device));
        }
        let values: Vec<f32> = (0..rows * cols)
            .map(|_| self.normal.sample(&mut self.rng))
            .collect();
        Param::from_tensor(Tensor::from_data(
            TensorData::new(values, [rows, cols]),
            &self.device,
        ))
    }

    fn linear(&mut self, in_features: usize, out_features: usize) -> Linear {
        Linear {
            weight: self.matrix(out_features, in_features),
        }
    }

    fn norm(&mut self, dim: usize, eps: f64) -> RmsNorm {
        RmsNorm {
            weight: Param::from_tensor(Tensor::ones([dim], &self.device)),
            eps,
        }
    }
}

impl Llama {
    /// A freshly initialised model on `device`.
    pub fn new(config: &ModelConfig, seed: u64, device: &Device) -> Self {
        Self::build(config, seed, device, false)
    }

    /// A model of shape `config` with every weight zero, for `params::import` to fill: skips
    /// drawing random weights that would be replaced (seconds for a 100M-parameter model).
    pub fn for_import(config: &ModelConfig, device: &Device) -> Self {
        Self::build(config, 0, device, true)
    }

    fn build(config: &ModelConfig, seed: u64, device: &Device, zeros: bool) -> Self {
        let mut init = Init {
            rng: ChaCha8Rng::seed_from_u64(seed),
            normal: Normal::new(0.0, config.init_std as f32).expect("valid std"),
            device: device.clone(),
            zeros,
        };
        let (dim, kv_dim) = (config.dim, config.n_kv_heads * config.head_dim());
        let embed_tokens = Embedding {
            weight: init.matrix(config.vocab_size, dim),
        };
        let layers = (0..config.n_layers)
            .map(|_| DecoderLayer {
                self_attn: Attention {
                    q_proj: init.linear(dim, dim),
                    k_proj: init.linear(dim, kv_dim),
                    v_proj: init.linear(dim, kv_dim),
                    o_proj: init.linear(dim, dim),
                    n_heads: config.n_heads,
                    n_kv_heads: config.n_kv_heads,
                },
                mlp: Mlp {
                    gate_proj: init.linear(dim, config.ffn_dim),
                    up_proj: init.linear(dim, config.ffn_dim),
                    down_proj: init.linear(config.ffn_dim, dim),
                },
                input_layernorm: init.norm(dim, config.norm_eps),
                post_attention_layernorm: init.norm(dim, config.norm_eps),
            })
            .collect();
        let norm = init.norm(dim, config.norm_eps);
        let lm_head = (!config.tie_embeddings).then(|| init.linear(dim, config.vocab_size));
        Self {
            model: Decoder {
                embed_tokens,
                layers,
                norm,
            },
            lm_head,
            config: config.clone(),
            rope: RopeTables::new(
                config.max_seq_len,
                config.head_dim(),
                config.rope_theta,
                device,
            ),
            kernels: config.kernels.resolve(device, config.head_dim()),
        }
    }

    /// Every parameter's name and shape, in the order the module visits them, without
    /// building the model: for checking weights before they are written elsewhere.
    pub fn param_shapes(config: &ModelConfig) -> Vec<(String, Vec<usize>)> {
        let (d, f, v) = (config.dim, config.ffn_dim, config.vocab_size);
        let kv = config.n_kv_heads * config.head_dim();
        let mut shapes = vec![("model.embed_tokens.weight".to_string(), vec![v, d])];
        for l in 0..config.n_layers {
            for (name, shape) in [
                ("self_attn.q_proj", vec![d, d]),
                ("self_attn.k_proj", vec![kv, d]),
                ("self_attn.v_proj", vec![kv, d]),
                ("self_attn.o_proj", vec![d, d]),
                ("mlp.gate_proj", vec![f, d]),
                ("mlp.up_proj", vec![f, d]),
                ("mlp.down_proj", vec![d, f]),
                ("input_layernorm", vec![d]),
                ("post_attention_layernorm", vec![d]),
            ] {
                shapes.push((format!("model.layers.{l}.{name}.weight"), shape));
            }
        }
        shapes.push(("model.norm.weight".to_string(), vec![d]));
        if !config.tie_embeddings {
            shapes.push(("lm_head.weight".to_string(), vec![v, d]));
        }
        shapes
    }

    /// The kernels this model runs.
    pub fn kernels(&self) -> Kernels {
        self.kernels
    }

    pub fn device(&self) -> Device {
        self.model.embed_tokens.weight.device()
    }

    /// Final hidden states (after the last norm), `[batch, seq, dim]`.
    pub fn hidden_states(&self, tokens: Tensor<2, Int>, cache: Option<&mut KvCache>) -> Tensor<3> {
        let [b, t] = tokens.dims();
        let layout = match &cache {
            Some(c) => SequenceLayout::cached(&c.left_pad, c.len, t),
            None => SequenceLayout::causal(b, t),
        };
        self.hidden_states_with_layout(tokens, &layout, cache)
    }

    /// Final hidden states of a batch whose tokens are placed by `layout` (packed samples,
    /// left padding, cached prefixes).
    pub fn hidden_states_with_layout(
        &self,
        tokens: Tensor<2, Int>,
        layout: &SequenceLayout,
        mut cache: Option<&mut KvCache>,
    ) -> Tensor<3> {
        let [b, t] = tokens.dims();
        assert_eq!(
            (layout.batch, layout.q_len),
            (b, t),
            "layout does not fit the tokens"
        );
        assert!(
            layout.k_len <= self.config.max_seq_len,
            "sequence of {} tokens exceeds model.max_seq_len {}",
            layout.k_len,
            self.config.max_seq_len
        );
        let group = self.config.n_heads / self.config.n_kv_heads;
        let prepared =
            PreparedLayout::new(layout, self.kernels, &self.rope, group, &tokens.device());
        let mut x = burn::tensor::module::embedding(self.model.embed_tokens.weight.val(), tokens);
        for (i, layer) in self.model.layers.iter().enumerate() {
            let layer_cache = cache.as_mut().map(|c| (&mut c.layers[i], c.len));
            let h = layer.input_layernorm.forward(x.clone(), self.kernels);
            x = x + layer.self_attn.forward(h, &prepared, layer_cache);
            let h = layer
                .post_attention_layernorm
                .forward(x.clone(), self.kernels);
            x = x + layer.mlp.forward(h, self.kernels);
        }
        if let Some(cache) = cache {
            cache.len += t;
        }
        self.model.norm.forward(x, self.kernels)
    }

    /// Next-token logits from hidden states: `[batch, seq, vocab]`.
    pub fn logits(&self, hidden: Tensor<3>) -> Tensor<3> {
        match &self.lm_head {
            Some(head) => head.forward(hidden),
            None => Linear {
                weight: self.model.embed_tokens.weight.clone(),
            }
            .forward(hidden),
        }
    }

    pub fn forward(&self, tokens: Tensor<2, Int>, cache: Option<&mut KvCache>) -> Tensor<3> {
        let hidden = self.hidden_states(tokens, cache);
        self.logits(hidden)
    }

    /// Mean next-token cross-entropy of `inputs` against `targets` (both `[batch, seq]`).
    pub fn loss(&self, inputs: Tensor<2, Int>, targets: Tensor<2, Int>) -> Tensor<1> {
        let [b, t] = inputs.dims();
        let logits = self.forward(inputs, None);
        let vocab = logits.dims()[2];
        kernels::cross_entropy(
            logits.reshape([b * t, vocab]),
            targets.reshape([b * t]),
            None,
            self.kernels,
        )
    }

    /// Mean cross-entropy over the tokens whose weight (0 or 1) is 1, for rows laid out by
    /// `layout` (packed samples): the loss of supervised fine-tuning. `inputs`, `targets` and
    /// `weights` are `[batch, seq]`.
    pub fn masked_loss(
        &self,
        inputs: Tensor<2, Int>,
        targets: Tensor<2, Int>,
        weights: Tensor<2>,
        layout: &SequenceLayout,
    ) -> Tensor<1> {
        let [b, t] = inputs.dims();
        let logits = self.logits(self.hidden_states_with_layout(inputs, layout, None));
        let vocab = logits.dims()[2];
        kernels::cross_entropy(
            logits.reshape([b * t, vocab]),
            targets.reshape([b * t]),
            Some(weights.reshape([b * t])),
            self.kernels,
        )
    }
}
