//! Just enough of the protobuf wire format to read and write an ONNX file without a protobuf
//! library or the ONNX schema compiled in: the top-level fields `model stamp` rewrites
//! ([`crate::stamp`]), and the graph's nodes, attributes and initializers the classifier loader
//! reads its class list from ([`crate::onnx`]).
//!
//! The field numbers are ONNX's (`onnx/onnx.proto`): `ModelProto.graph = 7`;
//! `GraphProto { node = 1, initializer = 5 }`; `NodeProto { input = 1, output = 2, op_type = 4,
//! attribute = 5 }`; `AttributeProto { name = 1, t = 5, ints = 8, strings = 9 }`;
//! `TensorProto { data_type = 2, int32_data = 5, string_data = 6, int64_data = 7, name = 8,
//! raw_data = 9, data_location = 14 }`. Fields may come in any order; a repeated number field may
//! be packed or not (onnx.proto is proto2, whose default is unpacked), both are read.

use thiserror::Error;

/// The bytes are not a protobuf message as far as the fields read go.
#[derive(Debug, Error, PartialEq, Eq)]
#[error("not an ONNX file: {0}")]
pub struct NotProtobuf(pub(crate) String);

/// A field: its number, the whole of its bytes (tag included), and its value.
pub(crate) struct Field<'a> {
    pub(crate) number: u64,
    pub(crate) bytes: &'a [u8],
    /// The payload of a length-delimited field.
    pub(crate) payload: Option<&'a [u8]>,
    /// The value of a varint field.
    pub(crate) varint: Option<u64>,
}

pub(crate) fn varint(bytes: &[u8], at: &mut usize) -> Result<u64, NotProtobuf> {
    let mut value = 0u64;
    for shift in (0..64).step_by(7) {
        let byte = *bytes
            .get(*at)
            .ok_or_else(|| NotProtobuf("a varint runs past the end".to_owned()))?;
        *at += 1;
        value |= u64::from(byte & 0x7f) << shift;
        if byte & 0x80 == 0 {
            return Ok(value);
        }
    }
    Err(NotProtobuf("a varint longer than 10 bytes".to_owned()))
}

pub(crate) fn put_varint(out: &mut Vec<u8>, mut value: u64) {
    while value >= 0x80 {
        out.push((value as u8) | 0x80);
        value >>= 7;
    }
    out.push(value as u8);
}

pub(crate) fn put_bytes(out: &mut Vec<u8>, number: u64, bytes: &[u8]) {
    put_varint(out, (number << 3) | 2);
    put_varint(out, bytes.len() as u64);
    out.extend_from_slice(bytes);
}

/// The fields of a message one at a time, so a reader can stop at the one it wants without
/// walking (or allocating for) a large tree ensemble's thousands of unpacked numbers.
pub(crate) struct Fields<'a> {
    bytes: &'a [u8],
    at: usize,
    failed: bool,
}

impl<'a> Iterator for Fields<'a> {
    type Item = Result<Field<'a>, NotProtobuf>;

    fn next(&mut self) -> Option<Self::Item> {
        if self.failed || self.at >= self.bytes.len() {
            return None;
        }
        let field = self.read();
        self.failed = field.is_err();
        Some(field)
    }
}

impl<'a> Fields<'a> {
    fn read(&mut self) -> Result<Field<'a>, NotProtobuf> {
        let bytes = self.bytes;
        let start = self.at;
        let tag = varint(bytes, &mut self.at)?;
        let (number, wire) = (tag >> 3, tag & 7);
        if number == 0 {
            return Err(NotProtobuf(format!("field number 0 at byte {start}")));
        }
        let (mut payload, mut value) = (None, None);
        match wire {
            0 => value = Some(varint(bytes, &mut self.at)?),
            1 => self.at += 8,
            5 => self.at += 4,
            2 => {
                let len = usize::try_from(varint(bytes, &mut self.at)?)
                    .map_err(|_| NotProtobuf("a length beyond memory".to_owned()))?;
                let end = self
                    .at
                    .checked_add(len)
                    .filter(|end| *end <= bytes.len())
                    .ok_or_else(|| {
                        NotProtobuf(format!(
                            "field {number} at byte {start} runs past the end (truncated file?)"
                        ))
                    })?;
                payload = Some(&bytes[self.at..end]);
                self.at = end;
            }
            other => {
                return Err(NotProtobuf(format!(
                    "wire type {other} of field {number} at byte {start}"
                )));
            }
        }
        if self.at > bytes.len() {
            return Err(NotProtobuf(format!(
                "field {number} at byte {start} runs past the end (truncated file?)"
            )));
        }
        Ok(Field {
            number,
            bytes: &bytes[start..self.at],
            payload,
            varint: value,
        })
    }
}

/// The fields of `bytes`, one at a time.
pub(crate) fn each_field(bytes: &[u8]) -> Fields<'_> {
    Fields {
        bytes,
        at: 0,
        failed: false,
    }
}

/// All the fields of `bytes`, in order.
pub(crate) fn fields(bytes: &[u8]) -> Result<Vec<Field<'_>>, NotProtobuf> {
    each_field(bytes).collect()
}

/// The payload of the first length-delimited field `number`, or `None`.
fn first_payload(bytes: &[u8], number: u64) -> Result<Option<&[u8]>, NotProtobuf> {
    for field in each_field(bytes) {
        let field = field?;
        if field.number == number
            && let Some(payload) = field.payload
        {
            return Ok(Some(payload));
        }
    }
    Ok(None)
}

fn text(bytes: &[u8]) -> String {
    String::from_utf8_lossy(bytes).into_owned()
}

/// Appends the integers of a repeated integer field, packed (one length-delimited field) or not
/// (one varint field per value). Negative numbers are ten-byte two's complement varints.
fn push_integers(field: &Field<'_>, out: &mut Vec<i64>) -> Result<(), NotProtobuf> {
    if let Some(value) = field.varint {
        out.push(value as i64);
    } else if let Some(packed) = field.payload {
        let mut at = 0;
        while at < packed.len() {
            out.push(varint(packed, &mut at)? as i64);
        }
    }
    Ok(())
}

/// `ModelProto.graph`.
const MODEL_GRAPH: u64 = 7;
/// `GraphProto.node`, `GraphProto.initializer`.
const GRAPH_NODE: u64 = 1;
const GRAPH_INITIALIZER: u64 = 5;
/// `NodeProto` fields.
const NODE_INPUT: u64 = 1;
const NODE_OUTPUT: u64 = 2;
const NODE_OP_TYPE: u64 = 4;
const NODE_ATTRIBUTE: u64 = 5;
/// `AttributeProto` fields.
const ATTRIBUTE_NAME: u64 = 1;
const ATTRIBUTE_TENSOR: u64 = 5;
const ATTRIBUTE_INTS: u64 = 8;
const ATTRIBUTE_STRINGS: u64 = 9;
/// `TensorProto` fields.
const TENSOR_DATA_TYPE: u64 = 2;
const TENSOR_INT32_DATA: u64 = 5;
const TENSOR_STRING_DATA: u64 = 6;
const TENSOR_INT64_DATA: u64 = 7;
const TENSOR_NAME: u64 = 8;
const TENSOR_RAW_DATA: u64 = 9;
const TENSOR_DATA_LOCATION: u64 = 14;
/// `TensorProto.DataType` values read.
const INT32: u64 = 6;
const INT64: u64 = 7;
const STRING: u64 = 8;

/// A graph's nodes (in file order) and its initializers, borrowed from the file's bytes.
#[derive(Debug)]
pub struct Graph<'a> {
    /// The nodes.
    pub nodes: Vec<Node<'a>>,
    /// The initializers' `TensorProto` bytes, read only when one is looked up.
    initializers: Vec<&'a [u8]>,
}

/// A node: what it computes, from and into which values; its attributes are read on demand.
#[derive(Debug)]
pub struct Node<'a> {
    /// `op_type`, e.g. `TreeEnsembleClassifier`.
    pub op_type: String,
    /// Names of the values it reads.
    pub inputs: Vec<String>,
    /// Names of the values it writes.
    pub outputs: Vec<String>,
    attributes: Vec<&'a [u8]>,
}

/// An attribute's list values (the only kinds read).
#[derive(Debug, Default, PartialEq, Eq)]
pub struct Attribute<'a> {
    /// `ints`.
    pub ints: Vec<i64>,
    /// `strings`.
    pub strings: Vec<String>,
    /// `t`, a `TensorProto`'s bytes ([`tensor_values`] reads it).
    pub tensor: Option<&'a [u8]>,
}

/// What a tensor holds, for the types a class list can have.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum TensorValues {
    /// int64 or int32 values.
    Integers(Vec<i64>),
    /// string values.
    Strings(Vec<String>),
}

/// The graph of an ONNX `ModelProto`'s bytes (an empty one when the file has none).
pub fn graph(model: &[u8]) -> Result<Graph<'_>, NotProtobuf> {
    let mut graph = Graph {
        nodes: Vec::new(),
        initializers: Vec::new(),
    };
    let Some(bytes) = first_payload(model, MODEL_GRAPH)? else {
        return Ok(graph);
    };
    for field in each_field(bytes) {
        let field = field?;
        match (field.number, field.payload) {
            (GRAPH_NODE, Some(node)) => graph.nodes.push(read_node(node)?),
            (GRAPH_INITIALIZER, Some(tensor)) => graph.initializers.push(tensor),
            _ => {}
        }
    }
    Ok(graph)
}

fn read_node(bytes: &[u8]) -> Result<Node<'_>, NotProtobuf> {
    let mut node = Node {
        op_type: String::new(),
        inputs: Vec::new(),
        outputs: Vec::new(),
        attributes: Vec::new(),
    };
    for field in each_field(bytes) {
        let field = field?;
        let Some(payload) = field.payload else {
            continue;
        };
        match field.number {
            NODE_INPUT => node.inputs.push(text(payload)),
            NODE_OUTPUT => node.outputs.push(text(payload)),
            NODE_OP_TYPE => node.op_type = text(payload),
            NODE_ATTRIBUTE => node.attributes.push(payload),
            _ => {}
        }
    }
    Ok(node)
}

impl<'a> Graph<'a> {
    /// The node that writes `value`, if a node does (not for the graph's inputs and initializers).
    pub fn producer(&self, value: &str) -> Option<&Node<'a>> {
        self.nodes
            .iter()
            .find(|node| node.outputs.iter().any(|output| output == value))
    }

    /// The `TensorProto` bytes of the initializer named `name`.
    pub fn initializer(&self, name: &str) -> Result<Option<&'a [u8]>, NotProtobuf> {
        for tensor in &self.initializers {
            if first_payload(tensor, TENSOR_NAME)? == Some(name.as_bytes()) {
                return Ok(Some(tensor));
            }
        }
        Ok(None)
    }
}

impl<'a> Node<'a> {
    /// The attribute called `name`, if the node has it.
    pub fn attribute(&self, name: &str) -> Result<Option<Attribute<'a>>, NotProtobuf> {
        for bytes in &self.attributes {
            // The name comes first in every serializer's output, so the search stops there and
            // does not walk the long lists of the other attributes.
            if first_payload(bytes, ATTRIBUTE_NAME)? != Some(name.as_bytes()) {
                continue;
            }
            let mut attribute = Attribute::default();
            for field in each_field(bytes) {
                let field = field?;
                match field.number {
                    ATTRIBUTE_INTS => push_integers(&field, &mut attribute.ints)?,
                    ATTRIBUTE_STRINGS => {
                        if let Some(payload) = field.payload {
                            attribute.strings.push(text(payload));
                        }
                    }
                    ATTRIBUTE_TENSOR => attribute.tensor = field.payload,
                    _ => {}
                }
            }
            return Ok(Some(attribute));
        }
        Ok(None)
    }
}

/// The values of a `TensorProto` of int64, int32 or strings; `None` for another type or for data
/// kept outside the file.
pub fn tensor_values(tensor: &[u8]) -> Result<Option<TensorValues>, NotProtobuf> {
    let (mut data_type, mut external) = (None, false);
    let (mut integers, mut strings, mut raw) = (Vec::new(), Vec::new(), None);
    for field in each_field(tensor) {
        let field = field?;
        match field.number {
            TENSOR_DATA_TYPE => data_type = field.varint,
            TENSOR_INT32_DATA | TENSOR_INT64_DATA => push_integers(&field, &mut integers)?,
            TENSOR_STRING_DATA => {
                if let Some(payload) = field.payload {
                    strings.push(text(payload));
                }
            }
            TENSOR_RAW_DATA => raw = field.payload,
            TENSOR_DATA_LOCATION => external = field.varint == Some(1),
            _ => {}
        }
    }
    if external {
        return Ok(None);
    }
    // raw_data is little-endian, fixed width; it replaces the typed field when present.
    let width = match data_type {
        Some(INT64) => 8,
        Some(INT32) => 4,
        Some(STRING) => return Ok(Some(TensorValues::Strings(strings))),
        _ => return Ok(None),
    };
    if let Some(raw) = raw {
        if raw.len() % width != 0 {
            return Err(NotProtobuf(format!(
                "raw_data of {} bytes is not a whole number of {width}-byte integers",
                raw.len()
            )));
        }
        integers = raw
            .chunks_exact(width)
            .map(|chunk| {
                let mut wide = [0u8; 8];
                wide[..width].copy_from_slice(chunk);
                if width == 4 {
                    // Sign-extend an int32.
                    i64::from(i32::from_le_bytes([wide[0], wide[1], wide[2], wide[3]]))
                } else {
                    i64::from_le_bytes(wide)
                }
            })
            .collect();
    } else if width == 4 {
        // int32_data holds int32 values as varints of their int64 sign extension already.
        integers = integers.into_iter().map(|v| i64::from(v as i32)).collect();
    }
    Ok(Some(TensorValues::Integers(integers)))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn put_varint_field(out: &mut Vec<u8>, number: u64, value: u64) {
        put_varint(out, number << 3);
        put_varint(out, value);
    }

    fn attribute(name: &str, ints: &[i64], packed: bool, strings: &[&str]) -> Vec<u8> {
        let mut out = Vec::new();
        put_bytes(&mut out, ATTRIBUTE_NAME, name.as_bytes());
        if packed {
            let mut list = Vec::new();
            for &value in ints {
                put_varint(&mut list, value as u64);
            }
            put_bytes(&mut out, ATTRIBUTE_INTS, &list);
        } else {
            for &value in ints {
                put_varint_field(&mut out, ATTRIBUTE_INTS, value as u64);
            }
        }
        for text in strings {
            put_bytes(&mut out, ATTRIBUTE_STRINGS, text.as_bytes());
        }
        out
    }

    fn node(op: &str, inputs: &[&str], outputs: &[&str], attributes: &[Vec<u8>]) -> Vec<u8> {
        let mut out = Vec::new();
        for input in inputs {
            put_bytes(&mut out, NODE_INPUT, input.as_bytes());
        }
        for output in outputs {
            put_bytes(&mut out, NODE_OUTPUT, output.as_bytes());
        }
        put_bytes(&mut out, NODE_OP_TYPE, op.as_bytes());
        for attribute in attributes {
            put_bytes(&mut out, NODE_ATTRIBUTE, attribute);
        }
        out
    }

    fn model(nodes: &[Vec<u8>], initializers: &[Vec<u8>]) -> Vec<u8> {
        let mut graph = Vec::new();
        for node in nodes {
            put_bytes(&mut graph, GRAPH_NODE, node);
        }
        put_bytes(&mut graph, 2, b"a graph name");
        for tensor in initializers {
            put_bytes(&mut graph, GRAPH_INITIALIZER, tensor);
        }
        let mut out = Vec::new();
        put_varint_field(&mut out, 1, 9);
        put_bytes(&mut out, 2, b"skl2onnx");
        put_bytes(&mut out, MODEL_GRAPH, &graph);
        out
    }

    #[test]
    fn integers_are_read_packed_or_not_and_negative() {
        for packed in [false, true] {
            let bytes = model(
                &[node(
                    "TreeEnsembleClassifier",
                    &["x"],
                    &["label", "probabilities"],
                    &[
                        attribute("nodes_featureids", &[3, 1, 4], packed, &[]),
                        attribute("classlabels_int64s", &[-2, 0, 7, i64::MAX], packed, &[]),
                    ],
                )],
                &[],
            );
            let graph = graph(&bytes).unwrap();
            let [tree] = graph.nodes.as_slice() else {
                panic!("{graph:?}")
            };
            assert_eq!(tree.op_type, "TreeEnsembleClassifier");
            assert_eq!(tree.inputs, ["x"]);
            assert_eq!(tree.outputs, ["label", "probabilities"]);
            let classes = tree.attribute("classlabels_int64s").unwrap().unwrap();
            assert_eq!(classes.ints, [-2, 0, 7, i64::MAX], "packed: {packed}");
            assert!(tree.attribute("classlabels_strings").unwrap().is_none());
            assert_eq!(
                graph.producer("probabilities").unwrap().op_type,
                tree.op_type
            );
            assert!(graph.producer("x").is_none());
        }
    }

    #[test]
    fn strings_are_read_in_order() {
        let bytes = model(
            &[node(
                "ZipMap",
                &["p"],
                &["out"],
                &[attribute(
                    "classlabels_strings",
                    &[],
                    false,
                    &["b", "a", "é"],
                )],
            )],
            &[],
        );
        let graph = graph(&bytes).unwrap();
        let classes = graph.nodes[0]
            .attribute("classlabels_strings")
            .unwrap()
            .unwrap();
        assert_eq!(classes.strings, ["b", "a", "é"]);
    }

    fn tensor(name: &str, data_type: u64, fill: impl FnOnce(&mut Vec<u8>)) -> Vec<u8> {
        let mut out = Vec::new();
        put_varint_field(&mut out, 1, 3);
        put_varint_field(&mut out, TENSOR_DATA_TYPE, data_type);
        fill(&mut out);
        put_bytes(&mut out, TENSOR_NAME, name.as_bytes());
        out
    }

    #[test]
    fn initializers_are_found_by_name_and_read_in_every_encoding() {
        let raw: Vec<u8> = [5i64, -1, 9].iter().flat_map(|v| v.to_le_bytes()).collect();
        let raw32: Vec<u8> = [5i32, -1, 9].iter().flat_map(|v| v.to_le_bytes()).collect();
        let bytes = model(
            &[],
            &[
                tensor("raw64", INT64, |out| put_bytes(out, TENSOR_RAW_DATA, &raw)),
                tensor("raw32", INT32, |out| {
                    put_bytes(out, TENSOR_RAW_DATA, &raw32)
                }),
                tensor("typed64", INT64, |out| {
                    let mut list = Vec::new();
                    for v in [5i64, -1, 9] {
                        put_varint(&mut list, v as u64);
                    }
                    put_bytes(out, TENSOR_INT64_DATA, &list);
                }),
                tensor("typed32", INT32, |out| {
                    for v in [5i64, -1, 9] {
                        put_varint_field(out, TENSOR_INT32_DATA, v as u64);
                    }
                }),
                tensor("names", STRING, |out| {
                    for v in ["setosa", "versicolor"] {
                        put_bytes(out, TENSOR_STRING_DATA, v.as_bytes());
                    }
                }),
                tensor("floats", 1, |out| put_bytes(out, 4, &[0; 8])),
                tensor("outside", INT64, |out| {
                    put_varint_field(out, TENSOR_DATA_LOCATION, 1);
                }),
            ],
        );
        let graph = graph(&bytes).unwrap();
        let values = |name: &str| tensor_values(graph.initializer(name).unwrap().unwrap()).unwrap();
        for name in ["raw64", "raw32", "typed64", "typed32"] {
            assert_eq!(
                values(name),
                Some(TensorValues::Integers(vec![5, -1, 9])),
                "{name}"
            );
        }
        assert_eq!(
            values("names"),
            Some(TensorValues::Strings(vec![
                "setosa".to_owned(),
                "versicolor".to_owned()
            ]))
        );
        assert_eq!(values("floats"), None);
        assert_eq!(values("outside"), None);
        assert!(graph.initializer("nothing").unwrap().is_none());
    }

    #[test]
    fn a_file_without_a_graph_has_no_nodes_and_a_truncated_one_is_refused() {
        assert!(graph(&[]).unwrap().nodes.is_empty());
        let bytes = model(
            &[node(
                "LinearClassifier",
                &["x"],
                &["l", "p"],
                &[attribute("classlabels_ints", &[0, 1], false, &[])],
            )],
            &[],
        );
        let err = graph(&bytes[..bytes.len() - 4]).unwrap_err();
        assert!(err.to_string().contains("truncated"), "{err}");
    }

    /// The committed fixtures, read without ONNX Runtime: the class lists skl2onnx wrote.
    #[test]
    fn the_fixtures_class_lists_are_read() {
        let dir =
            std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../../tests/models/fixtures");
        let read = |name: &str| std::fs::read(dir.join(name)).unwrap();
        let cancer = read("breast_cancer_logreg.onnx");
        let cancer = graph(&cancer).unwrap();
        let linear = cancer
            .nodes
            .iter()
            .find(|n| n.op_type == "LinearClassifier")
            .unwrap();
        assert_eq!(
            linear.attribute("classlabels_ints").unwrap().unwrap().ints,
            [0, 1]
        );
        let iris = read("iris_zipmap.onnx");
        let iris = graph(&iris).unwrap();
        let zipmap = iris.nodes.iter().find(|n| n.op_type == "ZipMap").unwrap();
        assert_eq!(
            zipmap
                .attribute("classlabels_strings")
                .unwrap()
                .unwrap()
                .strings,
            ["setosa", "versicolor", "virginica"]
        );
        let double = read("iris_double.onnx");
        let double = graph(&double).unwrap();
        let extractor = double
            .nodes
            .iter()
            .find(|n| n.op_type == "ArrayFeatureExtractor")
            .unwrap();
        let classes = double.initializer(&extractor.inputs[0]).unwrap().unwrap();
        assert_eq!(
            tensor_values(classes).unwrap(),
            Some(TensorValues::Strings(vec![
                "setosa".to_owned(),
                "versicolor".to_owned(),
                "virginica".to_owned()
            ]))
        );
    }
}
