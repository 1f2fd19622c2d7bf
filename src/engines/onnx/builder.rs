//! A small ONNX graph builder: named weights from a tch state dict become initializers, operators become
//! nodes with generated unique output names.

use std::collections::{BTreeMap, HashSet};

use anyhow::{ensure, Context, Result};
use tch::{Device, Kind, Tensor};

use super::manifest::{Dim, TensorSpec};
use super::proto::{
    attribute_type, AttributeProto, Dimension, DimensionValue, GraphProto, NodeProto, TensorProto,
    TensorShapeProto, TypeProto, TypeProtoTensor, ValueInfoProto, DTYPE_FLOAT, DTYPE_INT64,
};

/// Raw little-endian f32 bytes of a tensor (any device or float kind), in row-major order.
pub fn f32_bytes(t: &Tensor) -> Vec<u8> {
    let t = t
        .detach()
        .to_device(Device::Cpu)
        .to_kind(Kind::Float)
        .contiguous();
    let numel = t.numel();
    let mut bytes = vec![0u8; numel * 4];
    t.copy_data_u8(&mut bytes, numel);
    if cfg!(target_endian = "big") {
        for chunk in bytes.chunks_exact_mut(4) {
            chunk.reverse();
        }
    }
    bytes
}

/// An integer attribute.
pub fn attr_int(name: &str, value: i64) -> AttributeProto {
    AttributeProto {
        name: name.into(),
        i: value,
        r#type: attribute_type::INT,
        ..Default::default()
    }
}

/// A float attribute.
pub fn attr_float(name: &str, value: f32) -> AttributeProto {
    AttributeProto {
        name: name.into(),
        f: value,
        r#type: attribute_type::FLOAT,
        ..Default::default()
    }
}

/// An integer-list attribute.
pub fn attr_ints(name: &str, values: &[i64]) -> AttributeProto {
    AttributeProto {
        name: name.into(),
        ints: values.to_vec(),
        r#type: attribute_type::INTS,
        ..Default::default()
    }
}

/// The graph input/output declaration of a tensor spec.
pub fn value_info(spec: &TensorSpec) -> Result<ValueInfoProto> {
    let elem_type = match spec.dtype.as_str() {
        "float32" => DTYPE_FLOAT,
        "int64" => DTYPE_INT64,
        other => anyhow::bail!("unsupported ONNX element type {other}"),
    };
    let dim = spec
        .dims
        .iter()
        .map(|d| Dimension {
            value: Some(match d {
                Dim::Fixed(v) => DimensionValue::DimValue(*v),
                Dim::Symbolic(s) => DimensionValue::DimParam(s.clone()),
            }),
        })
        .collect();
    Ok(ValueInfoProto {
        name: spec.name.clone(),
        r#type: Some(TypeProto {
            tensor_type: Some(TypeProtoTensor {
                elem_type,
                shape: Some(TensorShapeProto { dim }),
            }),
        }),
        doc_string: String::new(),
    })
}

/// Builds one graph from the named parameters of a model.
pub struct GraphBuilder<'a> {
    weights: &'a BTreeMap<String, Tensor>,
    nodes: Vec<NodeProto>,
    initializers: Vec<TensorProto>,
    names: HashSet<String>,
    next_id: usize,
}

impl<'a> GraphBuilder<'a> {
    /// A builder that takes its weights from `weights` (MONAI parameter name -> tensor).
    pub fn new(weights: &'a BTreeMap<String, Tensor>) -> Self {
        Self {
            weights,
            nodes: Vec::new(),
            initializers: Vec::new(),
            names: HashSet::new(),
            next_id: 0,
        }
    }

    /// The shape of a named parameter (error naming it when the model has no such parameter).
    pub fn weight_shape(&self, name: &str) -> Result<Vec<i64>> {
        Ok(self.tensor(name)?.size())
    }

    fn tensor(&self, name: &str) -> Result<&Tensor> {
        self.weights
            .get(name)
            .with_context(|| format!("the model has no parameter '{name}'"))
    }

    /// Adds the named parameter as an f32 initializer of the same name (once) and returns the name.
    pub fn weight(&mut self, name: &str) -> Result<String> {
        if !self.names.contains(name) {
            let t = self.tensor(name)?;
            let tensor = TensorProto {
                dims: t.size(),
                data_type: DTYPE_FLOAT,
                name: name.to_string(),
                raw_data: f32_bytes(t),
            };
            self.initializers.push(tensor);
            self.names.insert(name.to_string());
        }
        Ok(name.to_string())
    }

    /// Adds (once) an f32 constant called `name`.
    pub fn const_f32(&mut self, name: &str, dims: &[i64], values: &[f32]) -> String {
        if !self.names.contains(name) {
            let raw_data = values.iter().flat_map(|v| v.to_le_bytes()).collect();
            self.initializers.push(TensorProto {
                dims: dims.to_vec(),
                data_type: DTYPE_FLOAT,
                name: name.to_string(),
                raw_data,
            });
            self.names.insert(name.to_string());
        }
        name.to_string()
    }

    /// Adds (once) a 1-D int64 constant called `name`.
    pub fn const_i64(&mut self, name: &str, values: &[i64]) -> String {
        if !self.names.contains(name) {
            let raw_data = values.iter().flat_map(|v| v.to_le_bytes()).collect();
            self.initializers.push(TensorProto {
                dims: vec![values.len() as i64],
                data_type: DTYPE_INT64,
                name: name.to_string(),
                raw_data,
            });
            self.names.insert(name.to_string());
        }
        name.to_string()
    }

    /// Appends a node with one output; the output is called `output` when given, else `<hint>/<op>_<n>`.
    pub fn op_named(
        &mut self,
        op_type: &str,
        inputs: &[&str],
        attribute: Vec<AttributeProto>,
        hint: &str,
        output: Option<&str>,
    ) -> String {
        self.next_id += 1;
        let node_name = format!("{hint}/{op_type}_{}", self.next_id);
        let out = output.map_or_else(|| node_name.clone(), str::to_string);
        self.names.insert(out.clone());
        self.nodes.push(NodeProto {
            input: inputs.iter().map(|s| s.to_string()).collect(),
            output: vec![out.clone()],
            name: node_name,
            op_type: op_type.into(),
            attribute,
            ..Default::default()
        });
        out
    }

    /// Appends a node with one generated output name.
    pub fn op(
        &mut self,
        op_type: &str,
        inputs: &[&str],
        attribute: Vec<AttributeProto>,
        hint: &str,
    ) -> String {
        self.op_named(op_type, inputs, attribute, hint, None)
    }

    /// The finished graph; every declared output must have been produced by a node.
    pub fn finish(
        self,
        name: &str,
        inputs: &[TensorSpec],
        outputs: &[TensorSpec],
    ) -> Result<GraphProto> {
        for o in outputs {
            ensure!(
                self.nodes.iter().any(|n| n.output.contains(&o.name)),
                "graph {name}: no node produces output {}",
                o.name
            );
        }
        Ok(GraphProto {
            node: self.nodes,
            name: name.into(),
            initializer: self.initializers,
            input: inputs.iter().map(value_info).collect::<Result<_>>()?,
            output: outputs.iter().map(value_info).collect::<Result<_>>()?,
            ..Default::default()
        })
    }
}
