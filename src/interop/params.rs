//! Parameters by name: the path of struct fields (`model.layers.0.mlp.up_proj.weight`), used
//! for checkpoints, for keying optimizer state, and for importing foreign weights.

use std::path::Path;

use anyhow::Result;
use burn::module::{Module, ModuleMapper, ModuleVisitor, Param, ParamId};
use burn::optim::GradientsParams;
use burn::tensor::{Tensor, TensorData};

use crate::interop::checkpoint::{NamedTensor, match_shapes};

/// Tracks the dotted path while a visitor or mapper walks a module.
#[derive(Default)]
pub struct PathTracker {
    parts: Vec<String>,
}

impl PathTracker {
    pub fn enter(&mut self, name: &str) {
        self.parts.push(name.to_string());
    }

    pub fn exit(&mut self) {
        self.parts.pop();
    }

    pub fn path(&self) -> String {
        self.parts.join(".")
    }
}

/// A parameter's name, id and shape.
#[derive(Debug, Clone)]
pub struct ParamInfo {
    pub name: String,
    pub id: ParamId,
    pub shape: Vec<usize>,
}

struct Lister {
    path: PathTracker,
    found: Vec<ParamInfo>,
}

impl ModuleVisitor for Lister {
    fn enter_module(&mut self, name: &str, _: &str) {
        self.path.enter(name);
    }

    fn exit_module(&mut self, _: &str, _: &str) {
        self.path.exit();
    }

    fn visit_float<const D: usize>(&mut self, param: &Param<Tensor<D>>) {
        self.found.push(ParamInfo {
            name: self.path.path(),
            id: param.id,
            shape: param.dims().to_vec(),
        });
    }
}

/// Every float parameter of `module`, in traversal order.
pub fn list<M: Module>(module: &M) -> Vec<ParamInfo> {
    let mut lister = Lister {
        path: PathTracker::default(),
        found: Vec::new(),
    };
    module.visit(&mut lister);
    lister.found
}

struct Exporter<'a> {
    path: PathTracker,
    tensors: Vec<NamedTensor>,
    /// Export these gradients (times `scale`) instead of the parameters.
    grads: Option<(&'a GradientsParams, f32)>,
}

impl ModuleVisitor for Exporter<'_> {
    fn enter_module(&mut self, name: &str, _: &str) {
        self.path.enter(name);
    }

    fn exit_module(&mut self, _: &str, _: &str) {
        self.path.exit();
    }

    fn visit_float<const D: usize>(&mut self, param: &Param<Tensor<D>>) {
        let tensor = match self.grads {
            None => param.val(),
            Some((grads, scale)) => match grads.get::<D>(param.id) {
                Some(g) => g.mul_scalar(scale),
                None => return,
            },
        };
        let shape = tensor.dims().to_vec();
        let values = tensor
            .into_data()
            .try_into_vec_as::<f32>()
            .expect("f32 tensor data");
        self.tensors.push(NamedTensor {
            name: self.path.path(),
            shape,
            values,
        });
    }
}

/// Copies every parameter to the host as f32.
pub fn export<M: Module>(module: &M) -> Vec<NamedTensor> {
    let mut exporter = Exporter {
        path: PathTracker::default(),
        tensors: Vec::new(),
        grads: None,
    };
    module.visit(&mut exporter);
    exporter.tensors
}

/// Copies the gradients of `module`'s parameters to the host, times `scale`, by parameter
/// name (parameters without a gradient are left out).
pub fn export_grads<M: Module>(
    module: &M,
    grads: &GradientsParams,
    scale: f32,
) -> Vec<NamedTensor> {
    let mut exporter = Exporter {
        path: PathTracker::default(),
        tensors: Vec::new(),
        grads: Some((grads, scale)),
    };
    module.visit(&mut exporter);
    exporter.tensors
}

struct Importer {
    path: PathTracker,
    tensors: std::vec::IntoIter<NamedTensor>,
}

impl ModuleMapper for Importer {
    fn enter_module(&mut self, name: &str, _: &str) {
        self.path.enter(name);
    }

    fn exit_module(&mut self, _: &str, _: &str) {
        self.path.exit();
    }

    fn map_float<const D: usize>(&mut self, param: Param<Tensor<D>>) -> Param<Tensor<D>> {
        let (id, old, mapper) = param.consume();
        let t = self
            .tensors
            .next()
            .expect("tensors were matched to parameters");
        debug_assert_eq!(t.name, self.path.path());
        let device = old.device();
        let mut new = Tensor::<D>::from_data(TensorData::new(t.values, t.shape), &device);
        if old.is_require_grad() {
            new = new.require_grad();
        }
        Param::from_mapped_value(id, new, mapper)
    }
}

/// Replaces every parameter of `module` by the tensor of the same name; every parameter must
/// be present with its exact shape, and no tensor may be left over. `source` names the file
/// in error messages.
pub fn import<M: Module>(module: M, tensors: Vec<NamedTensor>, source: &Path) -> Result<M> {
    let expected: Vec<(String, Vec<usize>)> = list(&module)
        .into_iter()
        .map(|p| (p.name, p.shape))
        .collect();
    let ordered = match_shapes(tensors, &expected, source)?;
    let mut importer = Importer {
        path: PathTracker::default(),
        tensors: ordered.into_iter(),
    };
    Ok(module.map(&mut importer))
}
