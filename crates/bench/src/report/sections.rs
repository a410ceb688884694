//! The report's markdown sections of the phases measured against the broker (throughput, the
//! latency curve, partitions, scaling, CPU and memory, start-up); [`super::Report::to_markdown`]
//! puts them in order. The `models` phase writes its own ([`crate::models`]).

use super::*;

impl Report {
    pub(super) fn write_throughput(&self, md: &mut String) -> std::fmt::Result {
        if self.ceiling.is_none() && self.pipeline.is_none() {
            return Ok(());
        }
        let s = &self.settings;
        writeln!(md, "## Throughput\n")?;
        writeln!(
            md,
            "| run | samples | seconds | samples/s | measured from → to |"
        )?;
        writeln!(md, "|---|---:|---:|---:|---|")?;
        if let Some(c) = &self.ceiling {
            writeln!(
                md,
                "| ceiling: bare lapin client | {} | {:.2} | {} | first publish → the ack covering the last y_true and y_pred. Same traffic as the pipeline (mean bodies: y_true {:.0} B, features {:.0} B, y_pred {:.0} B), durable queues from `Topology`, persistent, confirms in a window of {}, manual acks with `multiple` (the model role is the services' own consume loop: ack on confirm), prefetch {}; no model, no parsing, no files |",
                thousands(c.samples as f64),
                c.seconds,
                thousands(c.samples_per_second),
                c.mean_body_bytes[0],
                c.mean_body_bytes[1],
                c.mean_body_bytes[2],
                s.confirm_window,
                s.prefetch
            )?;
        }
        if let Some(p) = &self.pipeline {
            writeln!(
                md,
                "| pipeline: features → model → metric | {} | {:.2} | {} | just before spawning `features` (COUNT={}, RATE=0) → the last row seen in metric_log.csv (polled every 1 ms); includes the producer's start-up |",
                thousands(p.samples as f64),
                p.seconds,
                thousands(p.samples_per_second),
                p.samples
            )?;
            if let (Some(seconds), Some(rate)) = (
                p.seconds_from_first_message,
                p.samples_per_second_from_first_message,
            ) {
                writeln!(
                    md,
                    "| pipeline, without the producer's start-up | {} | {seconds:.2} | {} | first line of labels_log.txt (metric handled the first y_true) → the last row |",
                    thousands(p.samples as f64),
                    thousands(rate)
                )?;
            }
        }
        if let (Some(c), Some(p)) = (&self.ceiling, &self.pipeline) {
            writeln!(
                md,
                "| **ratio pipeline / ceiling** | | | **{:.2}** | pipeline (spawn → last row) / ceiling |",
                p.samples_per_second / c.samples_per_second
            )?;
        }
        writeln!(md)
    }

    pub(super) fn write_curve(&self, md: &mut String) -> std::fmt::Result {
        if self.curve.is_empty() {
            return Ok(());
        }
        writeln!(
            md,
            "## Latency against load: pipeline and bare client at the same rates\n"
        )?;
        writeln!(
            md,
            "Each point: the same number of samples at the same RATE (the producer's pacer in both), all guarantees on. **pipeline**: send (the producer's `sent_at_us` in the messages) → the metric service joined the sample (its second message arrived), read off its `pipeline_end_to_end_latency_seconds` histogram (quantiles interpolated inside buckets at most ×1.5 wide; max = the bucket's upper bound); the bare client's measure. The CSV flush after the join is in the per-hop table. **bare**: the bare client's send (after both messages went out) → its metric role received the second of the two, exact. Milliseconds; chart: `latency_curve.png`.\n"
        )?;
        writeln!(
            md,
            "| load | rate /s | samples | pipeline p50 | p99 | p99.9 | max | bare p50 | p99 | p99.9 | max | p99 pipeline / bare |"
        )?;
        writeln!(
            md,
            "|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"
        )?;
        let cells = |summary: Option<Summary>| {
            summary.map_or_else(
                || "– | – | – | –".to_owned(),
                |x| {
                    format!(
                        "{:.1} | {:.1} | {:.1} | {:.1}",
                        x.p50_ms, x.p99_ms, x.p999_ms, x.max_ms
                    )
                },
            )
        };
        for p in &self.curve {
            let ratio = p.pipeline.both_handled.zip(p.bare.latency).map_or_else(
                || "–".to_owned(),
                |(a, b)| format!("{:.2}", a.p99_ms / b.p99_ms),
            );
            writeln!(
                md,
                "| {:.0} % | {} | {} | {} | {} | {ratio} |",
                p.fraction * 100.0,
                thousands(p.rate),
                thousands(p.pipeline.samples as f64),
                cells(p.pipeline.per_sample),
                cells(p.bare.latency),
            )?;
        }
        writeln!(md)?;
        writeln!(
            md,
            "### Where the pipeline's time goes, per hop (p50 / p99 / p99.9 ms)\n"
        )?;
        writeln!(
            md,
            "| load | achieved /s | {} | model: publish → confirm of y_pred, p50 / p99 (its histogram) |",
            STAGE_HEADERS.join(" | ")
        )?;
        writeln!(
            md,
            "|---:|---:|{}---:|",
            "---:|".repeat(STAGE_HEADERS.len())
        )?;
        for p in &self.curve {
            // By name: a stage without figures (no model DEBUG log, say) is a dash, not a shift.
            let stages: Vec<String> = crate::pipeline_run::STAGES
                .iter()
                .map(|name| {
                    p.pipeline
                        .stages
                        .iter()
                        .find(|stage| stage.stage == *name)
                        .map_or_else(
                            || "–".to_owned(),
                            |stage| {
                                let x = stage.summary;
                                format!("{:.1} / {:.1} / {:.1}", x.p50_ms, x.p99_ms, x.p999_ms)
                            },
                        )
                })
                .collect();
            let confirm = p.pipeline.model_confirm.map_or_else(
                || "–".to_owned(),
                |c| format!("{:.1} / {:.1}", c.p50_ms, c.p99_ms),
            );
            writeln!(
                md,
                "| {:.0} % | {} | {} | {confirm} |",
                p.fraction * 100.0,
                thousands(p.pipeline.achieved_rate),
                stages.join(" | "),
            )?;
        }
        writeln!(md)
    }

    pub(super) fn write_partitions(&self, md: &mut String) -> std::fmt::Result {
        if self.partitions.is_empty() {
            return Ok(());
        }
        writeln!(
            md,
            "## Partitions and metric instances
"
        )?;
        writeln!(
            md,
            "Full speed, {} model replicas; CPU µs per sample of each component (broker: all its nodes together), all on this machine.\n",
            crate::partitions::MODELS
        )?;
        writeln!(
            md,
            "| nodes | queues | PARTITIONS | metric instances | samples | samples/s | CPU µs/sample: features | models | metric | broker | total |"
        )?;
        writeln!(
            md,
            "|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|"
        )?;
        for r in &self.partitions {
            let c = &r.cpu_us_per_sample;
            writeln!(
                md,
                "| {} | {} | {} | {} | {} | {} | {:.0} | {:.0} | {:.0} | {:.0} | {:.0} |",
                r.nodes,
                r.queue_type,
                r.partitions,
                r.metric_instances,
                thousands(r.samples as f64),
                thousands(r.samples_per_second),
                c.features,
                c.model,
                c.metric,
                c.broker,
                c.total()
            )?;
        }
        writeln!(md)
    }

    pub(super) fn write_scaling(&self, md: &mut String) -> std::fmt::Result {
        let mut runs: Vec<(String, &ThroughputResult)> = Vec::new();
        for r in &self.replicas {
            runs.push((format!("{} model replica(s), classic", r.models), r));
        }
        if let Some(cluster) = &self.cluster {
            runs.push((
                format!("quorum queues, {}-node private cluster", cluster.nodes),
                &cluster.throughput,
            ));
        }
        if let Some(b) = &self.backlog {
            runs.push((
                format!(
                    "backlog: {} samples queued, then model + metric started (drain)",
                    thousands(b.samples as f64)
                ),
                b,
            ));
        }
        if let Some(served) = self.models.as_ref().and_then(|m| m.served.as_ref()) {
            runs.push((
                format!(
                    "own model: the model serving {} (ONNX Runtime), classic",
                    file_name(&served.model)
                ),
                &served.run,
            ));
        }
        for (on, r) in &self.audit {
            runs.push((
                if *on {
                    "loss audit on (AUDIT_WINDOW_SECS=10, the default)".to_owned()
                } else {
                    "loss audit off (AUDIT_WINDOW_SECS=0, AUDIT=false)".to_owned()
                },
                r,
            ));
        }
        if runs.is_empty() {
            return Ok(());
        }
        writeln!(md, "## How cost grows with the work\n")?;
        writeln!(
            md,
            "CPU µs per sample: features (when it ran), model replicas together, metric, the broker (when local); peak RSS (VmHWM) per service.\n"
        )?;
        writeln!(
            md,
            "| run | samples | samples/s | CPU µs/sample: features | models | metric | broker | peak RSS MiB |"
        )?;
        writeln!(md, "|---|---:|---:|---:|---:|---:|---:|---|")?;
        for (name, r) in runs {
            let per = |seconds: f64| format!("{:.0}", seconds / r.samples as f64 * 1e6);
            let sum = |prefix: &str| -> Option<f64> {
                let found: Vec<f64> = r
                    .usage
                    .iter()
                    .filter(|u| u.service.starts_with(prefix))
                    .map(|u| u.usage.cpu_seconds)
                    .collect();
                (!found.is_empty()).then(|| found.iter().sum())
            };
            let rss: Vec<String> = r
                .usage
                .iter()
                .map(|u| format!("{} {:.1}", u.service, u.usage.peak_rss_mib))
                .collect();
            writeln!(
                md,
                "| {name} | {} | {} | {} | {} | {} | {} | {} |",
                thousands(r.samples as f64),
                thousands(r.samples_per_second),
                sum("features").map_or_else(|| "–".to_owned(), per),
                sum("model").map_or_else(|| "–".to_owned(), per),
                sum("metric").map_or_else(|| "–".to_owned(), per),
                r.broker_cpu_seconds.map_or_else(|| "–".to_owned(), per),
                rss.join(", ")
            )?;
        }
        writeln!(md)?;
        if let Some(cluster) = &self.cluster {
            let classic = self
                .curve
                .iter()
                .find(|p| (p.fraction - 0.5).abs() < 1e-9)
                .and_then(|p| p.pipeline.per_sample);
            let quorum = cluster.latency.per_sample;
            let cell = |s: Option<Summary>| {
                s.map_or_else(
                    || "– | –".to_owned(),
                    |s| format!("{:.1} | {:.1}", s.p50_ms, s.p99_ms),
                )
            };
            writeln!(
                md,
                "Latency at half of each one's maximum (send → joined, ms):\n"
            )?;
            writeln!(md, "| queues | rate /s | p50 | p99 |")?;
            writeln!(md, "|---|---:|---:|---:|")?;
            if let Some(p) = self.curve.iter().find(|p| (p.fraction - 0.5).abs() < 1e-9) {
                writeln!(
                    md,
                    "| classic, one node (the curve's 50 % point) | {} | {} |",
                    thousands(p.rate),
                    cell(classic)
                )?;
            }
            writeln!(
                md,
                "| quorum, {}-node private cluster | {} | {} |\n",
                cluster.nodes,
                thousands(cluster.latency.target_rate),
                cell(quorum)
            )?;
        }
        Ok(())
    }

    pub(super) fn write_usage(&self, md: &mut String) -> std::fmt::Result {
        let (Some(c), Some(p)) = (&self.ceiling, &self.pipeline) else {
            return Ok(());
        };
        writeln!(md, "## CPU and memory at full speed\n")?;
        writeln!(
            md,
            "| run | process | CPU s | CPU µs / sample | cores busy (CPU s / run s) | peak RSS MiB | source |"
        )?;
        writeln!(md, "|---|---|---:|---:|---:|---:|---|")?;
        let cpu_row = |md: &mut String,
                       run: &str,
                       process: &str,
                       cpu: Option<f64>,
                       (samples, seconds): (u64, f64),
                       rss: Option<f64>,
                       source: &str| {
            match cpu {
                Some(cpu) => writeln!(
                    md,
                    "| {run} | {process} | {cpu:.2} | {:.1} | {:.2} | {} | {source} |",
                    cpu / samples as f64 * 1e6,
                    cpu / seconds,
                    rss.map_or_else(|| "–".to_owned(), |rss| format!("{rss:.1}")),
                ),
                None => writeln!(md, "| {run} | {process} | – | – | – | – | {source} |"),
            }
        };
        let ceiling_run = (c.samples, c.seconds);
        let pipeline_run = (p.samples, p.seconds);
        cpu_row(
            md,
            "ceiling",
            "bare client (bench)",
            Some(c.client_cpu_seconds),
            ceiling_run,
            None,
            "/proc/self/stat over the run",
        )?;
        cpu_row(
            md,
            "ceiling",
            "broker (beam.smp)",
            c.broker_cpu_seconds,
            ceiling_run,
            None,
            BROKER_SOURCE,
        )?;
        for u in &p.usage {
            cpu_row(
                md,
                "pipeline",
                &u.service,
                Some(u.usage.cpu_seconds),
                pipeline_run,
                Some(u.usage.peak_rss_mib),
                u.source,
            )?;
        }
        cpu_row(
            md,
            "pipeline",
            "broker (beam.smp)",
            p.broker_cpu_seconds,
            pipeline_run,
            None,
            BROKER_SOURCE,
        )?;
        cpu_row(
            md,
            "pipeline",
            "bench (polling the CSV)",
            Some(p.bench_cpu_seconds),
            pipeline_run,
            None,
            "/proc/self/stat over the run",
        )?;
        writeln!(md)
    }

    pub(super) fn write_startup(&self, md: &mut String) -> std::fmt::Result {
        let Some(st) = &self.startup else {
            return Ok(());
        };
        let runs: Vec<String> = st
            .runs
            .iter()
            .map(|r| format!("{:.0}", r.healthy_ms))
            .collect();
        let fitted: Vec<String> = st
            .runs
            .iter()
            .map(|r| {
                r.fitted_ms
                    .map_or_else(|| "–".to_owned(), |f| format!("{f:.0}"))
            })
            .collect();
        writeln!(
            md,
            "## Model start-up (median of {} starts)\n",
            st.runs.len()
        )?;
        writeln!(md, "| from spawn to | median ms | each start, ms |")?;
        writeln!(md, "|---|---:|---|")?;
        writeln!(
            md,
            "| `/healthz` 200 (fitted, connected, consuming; polled every 1 ms) | {:.1} | {} |",
            st.median_healthy_ms,
            runs.join(", ")
        )?;
        writeln!(
            md,
            "| log line \"fitted linear regression\" | {} | {} |\n",
            st.median_fitted_ms
                .map_or_else(|| "–".to_owned(), |f| format!("{f:.1}")),
            fitted.join(", ")
        )
    }
}
