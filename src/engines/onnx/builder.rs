//! A small ONNX graph builder: named weights from a tch state dict become initializers, operators become
//! nodes with generated unique output names.

use std::collections::{BTreeMap, HashSet};

use anyhow::{ensure, Context, Result};
use tch::{Kind, Tensor};

use crate::engines::tensor_bytes::float_bytes;

use super::manifest::FloatType;
use super::manifest::{Dim, TensorSpec};
use super::proto::{
    attribute_type, AttributeProto, Dimension, DimensionValue, GraphProto, NodeProto, TensorProto,
    TensorShapeProto, TypeProto, TypeProtoTensor, ValueInfoProto, DTYPE_FLOAT, DTYPE_FLOAT16,
    DTYPE_INT64,
};

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

/// Builds one graph from the named parameters of a model, computing in `float_type`: with
/// [`FloatType::F16`] the parameters become float16 initializers (the nodes then compute in float16),
/// except those added with [`GraphBuilder::weight_f32`].
pub struct GraphBuilder<'a> {
    weights: &'a BTreeMap<String, Tensor>,
    float_type: FloatType,
    nodes: Vec<NodeProto>,
    initializers: Vec<TensorProto>,
    names: HashSet<String>,
    next_id: usize,
}

impl<'a> GraphBuilder<'a> {
    /// A builder that takes its weights from `weights` (MONAI parameter name -> tensor) in `float_type`.
    pub fn with_float_type(weights: &'a BTreeMap<String, Tensor>, float_type: FloatType) -> Self {
        Self {
            weights,
            float_type,
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

    /// The float type the graph computes in.
    pub fn float_type(&self) -> FloatType {
        self.float_type
    }

    /// Adds the named parameter as an initializer of the graph's float type and the same name (once) and returns
    /// the name; a value float16 cannot hold is an error naming the parameter.
    pub fn weight(&mut self, name: &str) -> Result<String> {
        self.weight_as(name, self.float_type)
    }

    /// Adds the named parameter as a float32 initializer (once), whatever the graph's float type (the scale and
    /// bias of normalizations computed in float32).
    pub fn weight_f32(&mut self, name: &str) -> Result<String> {
        self.weight_as(name, FloatType::F32)
    }

    fn weight_as(&mut self, name: &str, float_type: FloatType) -> Result<String> {
        if !self.names.contains(name) {
            let t = self.tensor(name)?;
            let (data_type, kind) = match float_type {
                FloatType::F32 => (DTYPE_FLOAT, Kind::Float),
                FloatType::F16 => (DTYPE_FLOAT16, Kind::Half),
            };
            let converted = t.detach().to_kind(kind);
            ensure!(
                converted.isfinite().all().int64_value(&[]) != 0,
                "parameter '{name}' has values that {float_type} cannot hold (infinite or NaN after conversion)"
            );
            let tensor = TensorProto {
                dims: t.size(),
                data_type,
                name: name.to_string(),
                raw_data: float_bytes(&converted, kind),
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

    /// Adds (once) a constant of the graph's float type called `name` (the values rounded to float16 in an fp16
    /// graph).
    pub fn const_float(&mut self, name: &str, dims: &[i64], values: &[f32]) -> String {
        match self.float_type {
            FloatType::F32 => self.const_f32(name, dims, values),
            FloatType::F16 => {
                if !self.names.contains(name) {
                    let t = Tensor::from_slice(values);
                    self.initializers.push(TensorProto {
                        dims: dims.to_vec(),
                        data_type: DTYPE_FLOAT16,
                        name: name.to_string(),
                        raw_data: float_bytes(&t, Kind::Half),
                    });
                    self.names.insert(name.to_string());
                }
                name.to_string()
            }
        }
    }

    /// `x` converted to `to` by a `Cast` node (`x` itself when the graph is float32 and so is `x`).
    pub fn cast(&mut self, x: &str, to: FloatType, hint: &str) -> String {
        let to_type = match to {
            FloatType::F32 => DTYPE_FLOAT,
            FloatType::F16 => DTYPE_FLOAT16,
        };
        self.op("Cast", &[x], vec![attr_int("to", to_type as i64)], hint)
    }

    /// A float32 graph input as the graph's compute float type (a `Cast` in an fp16 graph).
    pub fn float_input(&mut self, name: &str) -> String {
        match self.float_type {
            FloatType::F32 => name.to_string(),
            FloatType::F16 => self.cast(name, FloatType::F16, name),
        }
    }

    /// Appends a node whose result is the float32 graph output `output`: in an fp16 graph the node's result is
    /// cast to float32 into `output`.
    pub fn op_output(
        &mut self,
        op_type: &str,
        inputs: &[&str],
        attribute: Vec<AttributeProto>,
        hint: &str,
        output: &str,
    ) -> String {
        match self.float_type {
            FloatType::F32 => self.op_named(op_type, inputs, attribute, hint, Some(output)),
            FloatType::F16 => {
                let y = self.op(op_type, inputs, attribute, hint);
                let to = attr_int("to", DTYPE_FLOAT as i64);
                self.op_named("Cast", &[&y], vec![to], hint, Some(output))
            }
        }
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
