//! `models`: what serving a model of one's own costs (issue 26, "what it must measure").
//!
//! 1. In this process, for each fixture model (the JSON linear artifact `--linear-model`, or the
//!    fit on `--data-path` when it does not exist, and every `.onnx` in `--model-fixtures` that the
//!    service accepts): `ServedModel::predict` on one row, `--model-calls` calls cycling over the
//!    data set's rows arranged into the model's order, after one warm-up pass over the rows. Each
//!    call is timed alone (median, p99; the clock reads are included, and their own cost is
//!    measured and reported), then the same calls run untimed [`PASSES`] times: single-thread
//!    predictions/s of each pass (the report gives the best and the slowest).
//! 2. The pipeline at full speed through the `throughput` phase's own code
//!    ([`pipeline_run::throughput`]) with the model process serving `--onnx-model`: `MODEL_PATH`
//!    and `ORT_DYLIB_PATH` in the model process's environment only. Its samples/s against the
//!    ceiling of the same run, and the model replica's peak RSS with ONNX Runtime loaded, come
//!    from that run's figures.
//!
//! A fixture the service refuses is listed with its reason, not timed. Without `ORT_DYLIB_PATH`
//! only the linear model is timed and the report says what was left out.

use crate::latency::{self, Summary};
use crate::pipeline_run::{self, ThroughputResult};
use crate::report::{Report, TARGET_RATIO, file_name, thousands};
use crate::{Bench, progress};
use anyhow::{Context as _, bail};
use model::error::ModelError;
use model::served::{Engine, Prediction, ServedModel};
use pipeline::dataset::Dataset;
use serde::Serialize;
use std::fmt::Write as _;
use std::hint::black_box;
use std::path::{Path, PathBuf};
use std::time::Instant;

/// One model's in-process prediction time.
#[derive(Debug, Clone, Serialize)]
pub struct ModelTiming {
    /// The file (or the fit) it came from.
    pub model: String,
    /// `linear` or `onnx`.
    pub family: &'static str,
    /// The version it carries on predictions.
    pub version: String,
    /// What the service says about the export although it serves it.
    pub caveat: Option<&'static str>,
    /// Each call of `predict` timed alone (milliseconds, as every [`Summary`]).
    pub per_call: Summary,
    /// The same calls untimed, [`PASSES`] times: calls / seconds of each pass, one thread.
    pub passes_per_second: Vec<f64>,
}

impl ModelTiming {
    /// Predictions per second of the fastest untimed pass.
    pub fn best_per_second(&self) -> f64 {
        self.passes_per_second
            .iter()
            .copied()
            .fold(f64::NAN, f64::max)
    }

    /// Predictions per second of the slowest untimed pass.
    pub fn worst_per_second(&self) -> f64 {
        self.passes_per_second
            .iter()
            .copied()
            .fold(f64::NAN, f64::min)
    }
}

/// A fixture the service does not serve.
#[derive(Debug, Clone, Serialize)]
pub struct RefusedModel {
    /// Its file.
    pub model: String,
    /// The service's reason (the innermost error).
    pub reason: String,
}

/// The pipeline at full speed serving an .onnx.
#[derive(Debug, Clone, Serialize)]
pub struct ServedRun {
    /// Its file (`MODEL_PATH`), absolute.
    pub model: String,
    /// The version it carries on predictions.
    pub version: String,
    /// The run, as the `throughput` phase reports it.
    pub run: ThroughputResult,
}

/// What the phase measured.
#[derive(Debug, Clone, Serialize)]
pub struct ModelsResult {
    /// The models served, in-process (each timed over `rows` rows of the data set, cycling),
    /// and the fixtures refused.
    pub timings: Vec<ModelTiming>,
    pub refused: Vec<RefusedModel>,
    pub rows: usize,
    /// The median of a timed empty call: what the clock reads add to each per-call figure.
    pub clock_read_ns: f64,
    /// ONNX Runtime's library, when it was given, and the pipeline at full speed serving
    /// `--onnx-model` with it.
    pub runtime_library: Option<String>,
    pub served: Option<ServedRun>,
}

/// Runs the phase; what could not be measured is added to `failures`.
pub async fn measure(bench: &Bench, failures: &mut Vec<String>) -> anyhow::Result<ModelsResult> {
    let cli = &bench.cli;
    let runtime = cli
        .ort_dylib_path
        .as_deref()
        .map(std::path::absolute)
        .transpose()
        .context("cannot resolve ORT_DYLIB_PATH")?;
    let mut result = ModelsResult {
        rows: bench.data.len(),
        clock_read_ns: clock_read_ns(),
        runtime_library: runtime.as_ref().map(|path| path.display().to_string()),
        timings: Vec::new(),
        refused: Vec::new(),
        served: None,
    };

    let (linear_name, linear) = if cli.linear_model.is_file() {
        (
            cli.linear_model.display().to_string(),
            ServedModel::load(&cli.linear_model).map(|(model, _)| model),
        )
    } else {
        (
            format!("fit on {}", cli.data_path.display()),
            ServedModel::fit(&bench.data).map_err(anyhow::Error::from),
        )
    };
    time_or_refuse(bench, linear_name, linear, &mut result).await?;

    let Some(runtime) = runtime else {
        failures.push(
            "models: the .onnx fixtures and the pipeline serving an .onnx were not measured: \
             ORT_DYLIB_PATH is not set (export ORT_DYLIB_PATH=$(scripts/onnxruntime-lib))"
                .to_owned(),
        );
        return Ok(result);
    };
    model::onnx::use_runtime_library(Some(&runtime));
    for path in onnx_files(&cli.model_fixtures)? {
        let name = path.display().to_string();
        let loaded = ServedModel::load(&path).map(|(model, _)| model);
        if let Err(err) = &loaded
            && is_runtime_failure(err)
        {
            failures.push(format!("models: ONNX Runtime failed on {name}: {err:#}"));
            return Ok(result);
        }
        time_or_refuse(bench, name, loaded, &mut result).await?;
    }

    let served = std::path::absolute(&cli.onnx_model)
        .with_context(|| format!("cannot resolve {}", cli.onnx_model.display()))?;
    // The service fits on DATA_PATH while MODEL_PATH does not exist: check it does, and is served.
    let (model, _) = ServedModel::load(&served)?;
    let version = model.version.clone();
    drop(model);
    let variant = bench.with_model_env(&[
        ("MODEL_PATH", &served.display().to_string()),
        ("ORT_DYLIB_PATH", &runtime.display().to_string()),
    ]);
    progress!(
        "models: pipeline at full speed serving {}, {} samples",
        served.display(),
        cli.samples
    );
    let run = pipeline_run::throughput(&variant, "models", cli.samples, 1, false).await?;
    progress!("models: pipeline: {:.0} samples/s", run.samples_per_second);
    result.served = Some(ServedRun {
        model: served.display().to_string(),
        version,
        run,
    });
    Ok(result)
}

/// The `.onnx` files of `dir`, sorted by name.
fn onnx_files(dir: &Path) -> anyhow::Result<Vec<PathBuf>> {
    let entries =
        std::fs::read_dir(dir).with_context(|| format!("cannot list {}", dir.display()))?;
    let mut files = Vec::new();
    for entry in entries {
        let path = entry
            .with_context(|| format!("cannot list {}", dir.display()))?
            .path();
        if path.extension().is_some_and(|ext| ext == "onnx") {
            files.push(path);
        }
    }
    files.sort();
    Ok(files)
}

/// Whether `err` is ONNX Runtime missing or failing, not the model's fault.
fn is_runtime_failure(err: &anyhow::Error) -> bool {
    err.chain()
        .any(|cause| matches!(cause.downcast_ref(), Some(ModelError::Runtime(_))))
}

/// Times a loaded model on the data set in its order, or records why it is not served.
async fn time_or_refuse(
    bench: &Bench,
    name: String,
    loaded: anyhow::Result<ServedModel>,
    result: &mut ModelsResult,
) -> anyhow::Result<()> {
    let arranged = loaded.and_then(|model| match model.arrange_dataset(&bench.data) {
        Ok(rows) => Ok((model, rows)),
        Err(why) => bail!("it does not take the data set's columns: {why}"),
    });
    let (model, rows) = match arranged {
        Ok(pair) => pair,
        Err(err) => {
            progress!("models: {name}: refused: {}", err.root_cause());
            result.refused.push(RefusedModel {
                model: name,
                reason: err.root_cause().to_string(),
            });
            return Ok(());
        }
    };
    let calls = bench.cli.model_calls;
    let timing = tokio::task::spawn_blocking(move || time_predict(name, &model, &rows, calls))
        .await
        .context("the timing thread crashed")??;
    progress!(
        "models: {}: median {:.2} µs, p99 {:.2} µs, {:.0} predictions/s (best pass)",
        timing.model,
        timing.per_call.p50_ms * 1e3,
        timing.per_call.p99_ms * 1e3,
        timing.best_per_second()
    );
    result.timings.push(timing);
    Ok(())
}

/// Untimed passes of the calls per model: on a shared machine the best one is the least disturbed.
pub const PASSES: usize = 5;

/// `calls` predictions cycling over `rows`, after one warm-up pass: each timed alone, then all
/// untimed, [`PASSES`] times.
fn time_predict(
    name: String,
    model: &ServedModel,
    rows: &Dataset,
    calls: u64,
) -> anyhow::Result<ModelTiming> {
    // `answer`, as the handler calls it: a number, or a classifier's class and probabilities.
    let predict = |row: usize| -> anyhow::Result<Prediction> {
        let features = black_box(rows.row(row % rows.len()));
        model
            .answer(features)?
            .map_err(|err| anyhow::anyhow!("{name}: row {}: {err}", row % rows.len()))
    };
    for row in 0..rows.len() {
        black_box(predict(row)?);
    }
    let mut per_call_ms = Vec::with_capacity(calls as usize);
    for row in 0..calls as usize {
        let started = Instant::now();
        let y = predict(row);
        per_call_ms.push(started.elapsed().as_secs_f64() * 1e3);
        black_box(y?);
    }
    let mut passes_per_second = Vec::with_capacity(PASSES);
    for _ in 0..PASSES {
        let started = Instant::now();
        for row in 0..calls as usize {
            black_box(predict(row)?);
        }
        passes_per_second.push(calls as f64 / started.elapsed().as_secs_f64());
    }
    let per_call = latency::summarize(&mut per_call_ms).context("no calls were timed")?;
    Ok(ModelTiming {
        family: model.family(),
        version: model.version.clone(),
        caveat: match &model.engine {
            Engine::Onnx(graph) => graph.caveat(),
            Engine::Linear(_) | Engine::Logistic(_) => None,
        },
        per_call,
        passes_per_second,
        model: name,
    })
}

/// The median time of an empty timed call, in nanoseconds: the clock reads' own cost.
fn clock_read_ns() -> f64 {
    let mut ms: Vec<f64> = (0..10_000)
        .map(|_| {
            let started = Instant::now();
            black_box(());
            started.elapsed().as_secs_f64() * 1e3
        })
        .collect();
    latency::summarize(&mut ms).map_or(f64::NAN, |s| s.p50_ms * 1e6)
}

/// The `models` phase's part of the markdown report.
impl Report {
    /// The report's section of this phase (nothing when it did not run).
    pub(crate) fn write_models(&self, md: &mut String) -> std::fmt::Result {
        let Some(m) = &self.models else {
            return Ok(());
        };
        writeln!(md, "## Your own model (ONNX)\n")?;
        writeln!(
            md,
            "`ServedModel::predict` on one row, in the benchmark's process on one thread: {} calls per model cycling over the {} rows of the data set arranged into the model's order, after one warm-up pass over them. **median / p99**: each call timed alone with `Instant` (a timed empty call costs {:.0} ns, included in these figures); **predictions/s**: the same calls again untimed, {} passes, calls / seconds of the fastest pass (the least disturbed by other processes) and of the slowest. ONNX Runtime: {}.\n",
            m.timings
                .first()
                .map_or_else(|| "–".to_owned(), |t| thousands(t.per_call.samples as f64)),
            m.rows,
            m.clock_read_ns,
            crate::models::PASSES,
            m.runtime_library.as_deref().map_or_else(
                || "not given (ORT_DYLIB_PATH unset)".to_owned(),
                |lib| format!("`{lib}`")
            )
        )?;
        writeln!(
            md,
            "| model | family | version | median µs | p99 µs | p99.9 µs | max µs | predictions/s, 1 thread: best pass | slowest pass |"
        )?;
        writeln!(md, "|---|---|---|---:|---:|---:|---:|---:|---:|")?;
        for t in &m.timings {
            let x = t.per_call;
            writeln!(
                md,
                "| {} | {} | {} | {:.3} | {:.3} | {:.3} | {:.1} | {} | {} |",
                t.model,
                t.family,
                t.version,
                x.p50_ms * 1e3,
                x.p99_ms * 1e3,
                x.p999_ms * 1e3,
                x.max_ms * 1e3,
                thousands(t.best_per_second()),
                thousands(t.worst_per_second())
            )?;
        }
        writeln!(md)?;
        let caveats = m.timings.iter().filter_map(|t| {
            Some(format!(
                "- {}: served with a caveat: {}",
                t.model, t.caveat?
            ))
        });
        let refused = m.refused.iter().map(|r| {
            format!(
                "- {}: refused by the service, not timed: {}",
                r.model,
                r.reason.replace('\n', " ")
            )
        });
        let notes: Vec<String> = caveats.chain(refused).collect();
        writeln!(md, "{}\n", notes.join("\n"))?;
        let Some(ServedRun {
            model: served,
            version,
            run: p,
        }) = &m.served
        else {
            return Ok(());
        };
        writeln!(
            md,
            "The pipeline at full speed serving `{served}` (version {version}): the `throughput` phase's run (COUNT={}, RATE=0, one model replica) with `MODEL_PATH` and `ORT_DYLIB_PATH` set in the model process's environment only; the ceiling is this run's.\n",
            p.samples
        )?;
        writeln!(
            md,
            "| run | samples | samples/s | / ceiling | model peak RSS MiB | model CPU µs/sample |"
        )?;
        writeln!(md, "|---|---:|---:|---:|---:|---:|")?;
        let ceiling = self.ceiling.as_ref().map(|c| c.samples_per_second);
        if let Some(c) = &self.ceiling {
            writeln!(
                md,
                "| ceiling: bare lapin client | {} | {} | 1.00 | – | – |",
                thousands(c.samples as f64),
                thousands(c.samples_per_second)
            )?;
        }
        let mut runs = Vec::new();
        if let Some(linear) = &self.pipeline {
            runs.push((
                "pipeline, the JSON linear model (throughput phase)".to_owned(),
                linear,
            ));
        }
        runs.push((format!("pipeline, {}", file_name(served)), p));
        for (name, r) in runs {
            let model = r.usage.iter().find(|u| u.service == "model");
            writeln!(
                md,
                "| {name} | {} | {} | {} | {} | {} |",
                thousands(r.samples as f64),
                thousands(r.samples_per_second),
                ceiling.map_or_else(
                    || "–".to_owned(),
                    |c| format!("{:.2}", r.samples_per_second / c)
                ),
                model.map_or_else(
                    || "–".to_owned(),
                    |u| format!("{:.1}", u.usage.peak_rss_mib)
                ),
                model.map_or_else(
                    || "–".to_owned(),
                    |u| format!("{:.0}", u.usage.cpu_seconds / r.samples as f64 * 1e6)
                ),
            )?;
        }
        writeln!(md)?;
        match ceiling {
            Some(c) => {
                let ratio = p.samples_per_second / c;
                writeln!(
                    md,
                    "Target: the pipeline serving {} at ≥ {TARGET_RATIO} × the ceiling: **{}** (ratio {ratio:.2}).\n",
                    file_name(served),
                    if ratio >= TARGET_RATIO {
                        "met"
                    } else {
                        "not met"
                    }
                )
            }
            None => writeln!(
                md,
                "Target ≥ {TARGET_RATIO} × the ceiling: not judged, the ceiling was not measured in this run.\n"
            ),
        }
    }
}
