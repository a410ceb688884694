//! Writing the pipeline's keys into an ONNX file's `metadata_props`, so one file carries
//! everything the service needs (`model stamp`).
//!
//! An ONNX file is a protobuf `ModelProto`; `metadata_props` is its field 14, a repeated
//! `StringStringEntryProto { key = 1, value = 2 }`. Protobuf lets fields come in any order and
//! repeats be appended, so stamping keeps every other top-level field's bytes as they are, drops
//! the entries whose keys are being written, and appends the new ones: no protobuf library, no
//! re-encoding of the graph (a whole-message codec would need the ONNX schema compiled in). The
//! wire format is read and written by [`crate::protobuf`].

use crate::drift::Reference;
use crate::onnx::keys;
pub use crate::protobuf::NotProtobuf;
use crate::protobuf::{fields, put_bytes};
use crate::served::{Evaluation, ServedModel};
use anyhow::Context as _;
use pipeline::dataset::Dataset;

/// `ModelProto.metadata_props`.
const METADATA_PROPS: u64 = 14;

/// The key of a `StringStringEntryProto`.
fn entry_key(entry: &[u8]) -> Option<&[u8]> {
    fields(entry)
        .ok()?
        .into_iter()
        .find(|field| field.number == 1)
        .and_then(|field| field.payload)
}

/// `model` with `props` written into its `metadata_props`, replacing entries of the same keys.
pub fn stamp(model: &[u8], props: &[(&str, &str)]) -> Result<Vec<u8>, NotProtobuf> {
    let mut out = Vec::with_capacity(model.len() + 256);
    for field in fields(model)? {
        let replaced = field.number == METADATA_PROPS
            && field
                .payload
                .and_then(entry_key)
                .is_some_and(|key| props.iter().any(|(k, _)| k.as_bytes() == key));
        if !replaced {
            out.extend_from_slice(field.bytes);
        }
    }
    for (key, value) in props {
        let mut entry = Vec::with_capacity(key.len() + value.len() + 8);
        put_bytes(&mut entry, 1, key.as_bytes());
        put_bytes(&mut entry, 2, value.as_bytes());
        put_bytes(&mut out, METADATA_PROPS, &entry);
    }
    Ok(out)
}

/// The `metadata_props` of `model`, in file order (for tests and `model inspect`).
pub fn metadata_props(model: &[u8]) -> Result<Vec<(String, String)>, NotProtobuf> {
    let mut out = Vec::new();
    for field in fields(model)? {
        if field.number != METADATA_PROPS {
            continue;
        }
        let entry = fields(field.payload.unwrap_or_default())?;
        let text = |n: u64| {
            entry
                .iter()
                .find(|f| f.number == n)
                .and_then(|f| f.payload)
                .map(|p| String::from_utf8_lossy(p).into_owned())
                .unwrap_or_default()
        };
        out.push((text(1), text(2)));
    }
    Ok(out)
}

/// An ONNX model with the pipeline's keys written in, checked as the service would load it.
#[derive(Debug)]
pub struct Stamped {
    /// The file's new bytes.
    pub bytes: Vec<u8>,
    /// The model they load as.
    pub model: ServedModel,
    /// How a regressor does on the data it was stamped with, when there was data.
    pub fit: Option<Evaluation>,
}

/// Stamps `version`, the feature `names` and, with `data`, its target name and the drift
/// reference of `data` (so the model's drift figures start from what it was trained on) into an
/// ONNX file, and loads the result (`model stamp`, and the trainer for what `TRAIN_COMMAND`
/// writes).
pub fn stamp_onnx(
    bytes: &[u8],
    version: &str,
    names: Option<&[String]>,
    data: Option<&Dataset>,
) -> anyhow::Result<Stamped> {
    pipeline::messages::validate_id(version).map_err(|_| {
        anyhow::anyhow!("version {version:?}: use 1 to 128 characters of A-Z a-z 0-9 . _ : -")
    })?;
    let joined = names.map(|names| names.join(","));
    let mut props: Vec<(&str, &str)> = vec![(keys::VERSION, version)];
    if let Some(joined) = &joined {
        props.push((keys::FEATURE_NAMES, joined));
    }
    if let Some(data) = data {
        props.push((keys::TARGET_NAME, data.target_name.as_str()));
    }
    let named = stamp(bytes, &props)?;
    let model = ServedModel::onnx(&named).context("the stamped model is refused")?;
    let Some(data) = data else {
        return Ok(Stamped {
            bytes: named,
            model,
            fit: None,
        });
    };
    // The reference's in-sample error: a regressor's MAE, a classifier's log loss.
    let (fit, in_sample) = match model.task() {
        pipeline::classes::Task::Regression => {
            let fit = model.evaluate(data)?;
            let mae = fit.mae;
            (Some(fit), mae)
        }
        pipeline::classes::Task::Classification => (None, model.evaluate_classes(data)?.log_loss),
    };
    let arranged = model.arrange_dataset(data).map_err(anyhow::Error::msg)?;
    let reference = serde_json::to_string(&Reference::of(&arranged, in_sample))?;
    let bytes = stamp(&named, &[(keys::REFERENCE, reference.as_str())])?;
    let model = ServedModel::onnx(&bytes).context("the stamped model is refused")?;
    Ok(Stamped { bytes, model, fit })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::protobuf::put_varint;
    use proptest::prelude::*;

    /// A small message: ir_version (varint), producer_name (string), one metadata entry.
    fn model() -> Vec<u8> {
        let mut out = Vec::new();
        put_varint(&mut out, 1 << 3);
        put_varint(&mut out, 8);
        put_bytes(&mut out, 2, b"skl2onnx");
        let mut entry = Vec::new();
        put_bytes(&mut entry, 1, b"version");
        put_bytes(&mut entry, 2, b"old");
        put_bytes(&mut out, METADATA_PROPS, &entry);
        let mut other = Vec::new();
        put_bytes(&mut other, 1, b"author");
        put_bytes(&mut other, 2, b"me");
        put_bytes(&mut out, METADATA_PROPS, &other);
        out
    }

    #[test]
    fn stamping_replaces_its_keys_and_keeps_the_rest() {
        let stamped = stamp(&model(), &[("version", "v2"), ("feature_names", "a,b")]).unwrap();
        assert_eq!(
            metadata_props(&stamped).unwrap(),
            [
                ("author".to_owned(), "me".to_owned()),
                ("version".to_owned(), "v2".to_owned()),
                ("feature_names".to_owned(), "a,b".to_owned()),
            ]
        );
        assert!(
            stamped.starts_with(&model()[..12]),
            "other fields kept as they were"
        );
        let again = stamp(&stamped, &[("version", "v2"), ("feature_names", "a,b")]).unwrap();
        assert_eq!(again, stamped, "stamping twice changes nothing");
    }

    #[test]
    fn a_truncated_file_is_refused() {
        let bytes = model();
        let err = stamp(&bytes[..bytes.len() - 3], &[("version", "v")]).unwrap_err();
        assert!(err.to_string().contains("truncated"), "{err}");
    }

    proptest! {
        /// Any values (long ones need multi-byte lengths) read back as written.
        #[test]
        fn values_round_trip(value in ".{0,300}", key in "[a-z_]{1,20}") {
            let stamped = stamp(&model(), &[(key.as_str(), value.as_str())]).unwrap();
            let props = metadata_props(&stamped).unwrap();
            prop_assert_eq!(props.last().cloned(), Some((key, value)));
        }
    }
}
