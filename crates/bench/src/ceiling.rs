//! The ceiling: a bare lapin client doing exactly the pipeline's broker traffic, and nothing else.
//!
//! Three connections play the three services, each as a task of its own:
//! - producer: per sample, publishes `y_true` then `features` (the producer's bodies, built with
//!   the producer's `write_y_true`/`write_features` from rows its `Sampler` picks, uuid ids),
//!   persistent, mandatory, with publisher confirms awaited in a window of `CONFIRM_WINDOW` samples (the
//!   shared `ConfirmWindow`, as the producer uses);
//! - model: the services' own consume loop (`run_consumer`, prefetch `PREFETCH`) with a handler
//!   that publishes a `y_pred` body of the model's shape and size (the model's `write_y_pred`, a
//!   real prediction and the real model version) and answers `Publish`: the loop acks the
//!   input once the broker confirms the output, exactly as in the model;
//! - metric: consumes `y_true` and `y_pred` on one channel (exclusive consumers, prefetch
//!   `PREFETCH` each) and acks each batch with `multiple`.
//!
//! No JSON is parsed, no model runs, no file is written. The queues are declared with
//! [`Topology`], so their arguments are the services'. Samples per second = samples / (first
//! publish to the ack that covers the last `y_true` and `y_pred`).
//!
//! Paced at a rate (the producer's own [`Pacer`]), it is the latency limit: each sample's time from
//! its send (right after both messages went out) to the metric role holding both its `y_true` and
//! its `y_pred`, the point where the metric service would join them. One process, one clock.

use crate::Bench;
use crate::broker::connect;
use crate::latency::{Summary, summarize};
use crate::process::{Usage, cpu_seconds};
use anyhow::{Context as _, bail, ensure};
use features::{Order, Pacer, Sampler};
use futures_util::{FutureExt as _, StreamExt as _};
use lapin::message::Delivery;
use lapin::options::{BasicAckOptions, BasicConsumeOptions, BasicQosOptions};
use lapin::types::FieldTable;
use lapin::{Channel, Connection, Consumer};
use model::regression::LinearModel;
use pipeline::CancellationToken;
use pipeline::broker::Topology;
use pipeline::broker::consumer::ConsumerSpec;
use pipeline::broker::publisher::{Confirm, record_confirms};
use pipeline::broker::window::{ConfirmWindow, Published};
use pipeline::broker::{
    Broker, Disposition, HandlerError, MessageHandler, Outgoing, Publisher, run_consumer,
};
use pipeline::config::{BrokerConfig, ConsumeConfig};
use pipeline::dataset::Dataset;
use pipeline::health::Health;
use pipeline::messages::{BodyFormat, now_us, write_features, write_y_pred, write_y_true};
use pipeline::metrics::BrokerMetrics;
use serde::Serialize;
use std::collections::{HashMap, HashSet, VecDeque};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};
use tokio::task::JoinSet;

/// Longest time without a single message acked before the run is declared stuck.
const STALL_TIMEOUT: Duration = Duration::from_secs(60);

/// What the ceiling run measured.
#[derive(Debug, Clone, Serialize)]
pub struct CeilingResult {
    /// Samples sent through.
    pub samples: u64,
    /// Samples per second asked for (0: as fast as the broker confirms).
    pub target_rate: f64,
    /// From the first publish to the last ack, in seconds.
    pub seconds: f64,
    /// Samples per second.
    pub samples_per_second: f64,
    /// Mean body sizes in bytes: `y_true`, `features`, `y_pred`.
    pub mean_body_bytes: [f64; 3],
    /// CPU time of the client (this process) over the run, in seconds.
    pub client_cpu_seconds: f64,
    /// CPU time of the broker over the run, when it runs on this machine.
    pub broker_cpu_seconds: Option<f64>,
    /// Per sample: its send to the metric role holding both of its messages.
    pub latency: Option<Summary>,
}

/// Settings shared by the three roles.
#[derive(Clone)]
struct Plan {
    samples: u64,
    rate: f64,
    prefetch: u16,
    window: usize,
    topology: pipeline::config::TopologyMode,
    features_queue: String,
    y_true_queue: String,
    y_pred_queue: String,
}

/// Runs the bare client on fresh queues of `phase`, `samples` samples at `rate` per second (0: as
/// fast as the broker confirms), and deletes the queues afterwards.
pub async fn run(
    bench: &Bench,
    phase: &str,
    samples: u64,
    rate: f64,
) -> anyhow::Result<CeilingResult> {
    let url = bench.url()?;
    let queues = bench.queues(phase);
    let plan = Plan {
        samples,
        rate,
        prefetch: bench.cli.consume.prefetch,
        window: usize::try_from(bench.cli.confirm_window).unwrap_or(usize::MAX),
        topology: bench.cli.broker.topology,
        features_queue: queues.features.clone(),
        y_true_queue: queues.y_true.clone(),
        y_pred_queue: queues.y_pred.clone(),
    };
    let topology = |names: &[&str]| Topology::new(&bench.cli.broker, names);
    // The real prediction's shape: same digits, same version string.
    let model = LinearModel::fit(&bench.data).context("cannot fit the model")?;
    let prediction = model
        .predict(bench.data.row(0))
        .context("cannot predict row 0")?;

    // Set up consumers first, as in the pipeline run where model and metric are ready before the
    // producer starts.
    let metric_connection = connect(&url, "bench ceiling (metric)").await?;
    let metric_channel = metric_connection.create_channel().await?;
    topology(&[&plan.y_true_queue, &plan.y_pred_queue])
        .declare(&metric_channel)
        .await?;
    metric_channel
        .basic_qos(plan.prefetch, BasicQosOptions::default())
        .await?;
    let mut metric_consumers = Vec::new();
    for queue in [&plan.y_true_queue, &plan.y_pred_queue] {
        metric_consumers.push(consume(&metric_channel, queue, "metric", true).await?);
    }

    let producer_connection = connect(&url, "bench ceiling (features)").await?;
    let producer_channel =
        Publisher::open(&producer_connection, "features", unregistered_metrics()).await?;
    topology(&[&plan.features_queue, &plan.y_true_queue])
        .declare(producer_channel.channel())
        .await?;

    let client_cpu_before = Usage::of_running(std::process::id())?.cpu_seconds;
    let broker_cpu_before = cpu_seconds(bench.broker_pid);
    let acked = Arc::new(AtomicU64::new(0));
    let mut roles = JoinSet::new();
    roles.spawn(metric_role(
        plan.clone(),
        metric_channel,
        metric_consumers,
        Arc::clone(&acked),
    ));
    // The consume loop's future is not `Send` (as in the model, which runs it on its main task):
    // it runs on a thread of its own, driving this runtime's I/O.
    let runtime = tokio::runtime::Handle::current();
    let (model_plan, broker, consume) = (
        plan.clone(),
        bench.cli.broker.clone(),
        bench.cli.consume.clone(),
    );
    let version = model.version.clone();
    roles.spawn(async move {
        tokio::task::spawn_blocking(move || {
            runtime.block_on(model_role(model_plan, broker, consume, prediction, version))
        })
        .await
        .context("the model role crashed")?
    });
    roles.spawn(producer_role(
        plan.clone(),
        producer_channel,
        Arc::clone(&bench.data),
    ));

    // Wait for the three roles, watching that messages keep being acked. Dropping the JoinSet
    // (on error or interruption) aborts the roles.
    let mut first_publish = None;
    let mut last_ack = None;
    let mut body_bytes = [0u64; 3];
    let (mut sent, mut both_in) = (Vec::new(), Vec::new());
    let mut progress = (0u64, Instant::now());
    while !roles.is_empty() {
        tokio::select! {
            joined = roles.join_next() => match joined {
                Some(Ok(Ok(done))) => {
                    match done {
                        RoleDone::Producer { first_publish: at, y_true_bytes, features_bytes, sent: times } => {
                            first_publish = Some(at);
                            sent = times;
                            body_bytes[0] = y_true_bytes;
                            body_bytes[1] = features_bytes;
                        }
                        RoleDone::Model { y_pred_bytes } => body_bytes[2] = y_pred_bytes,
                        RoleDone::Metric { last_ack: at, both_in: times } => {
                            last_ack = Some(at);
                            both_in = times;
                        }
                    }
                }
                Some(Ok(Err(err))) => return Err(err.context("the ceiling run failed")),
                Some(Err(err)) => bail!("a ceiling role crashed: {err}"),
                None => break,
            },
            _ = tokio::time::sleep(Duration::from_secs(1)) => {
                let now = acked.load(Ordering::Relaxed);
                if now != progress.0 {
                    progress = (now, Instant::now());
                } else if progress.1.elapsed() > STALL_TIMEOUT {
                    bail!("the ceiling run is stuck: {now} messages acked, none for {STALL_TIMEOUT:?}");
                }
            }
        }
    }
    let client_cpu_seconds = Usage::of_running(std::process::id())?.cpu_seconds - client_cpu_before;
    let broker_cpu_seconds = cpu_seconds(bench.broker_pid)
        .zip(broker_cpu_before)
        .map(|(after, before)| after - before);
    for connection in [producer_connection, metric_connection] {
        close(&connection).await;
    }
    bench.ledger.delete(&url, &queues).await?;

    let (Some(first_publish), Some(last_ack)) = (first_publish, last_ack) else {
        bail!("the ceiling run ended without its timestamps");
    };
    let seconds = last_ack.duration_since(first_publish).as_secs_f64();
    let n = plan.samples as f64;
    let sent: HashMap<String, Instant> = sent.into_iter().collect();
    let mut latencies_ms: Vec<f64> = both_in
        .iter()
        .filter_map(|(id, at)| {
            Some(at.saturating_duration_since(*sent.get(id)?).as_secs_f64() * 1e3)
        })
        .collect();
    Ok(CeilingResult {
        samples: plan.samples,
        target_rate: plan.rate,
        latency: summarize(&mut latencies_ms),
        seconds,
        samples_per_second: n / seconds,
        mean_body_bytes: body_bytes.map(|total| total as f64 / n),
        client_cpu_seconds,
        broker_cpu_seconds,
    })
}

/// How a role finished, with what it measured.
enum RoleDone {
    Producer {
        first_publish: Instant,
        y_true_bytes: u64,
        features_bytes: u64,
        /// Each sample's id and send time.
        sent: Vec<(String, Instant)>,
    },
    Model {
        y_pred_bytes: u64,
    },
    Metric {
        last_ack: Instant,
        /// Each sample's id and when its second message arrived.
        both_in: Vec<(String, Instant)>,
    },
}

/// Broker metrics that nobody scrapes: the shared [`Publisher`] counts confirms into them.
fn unregistered_metrics() -> BrokerMetrics {
    BrokerMetrics::register(&mut prometheus_client::registry::Registry::default())
}

/// Starts a consumer on `queue`.
async fn consume(
    channel: &Channel,
    queue: &str,
    role: &str,
    exclusive: bool,
) -> anyhow::Result<Consumer> {
    let tag = format!("bench-ceiling-{role}-{queue}");
    channel
        .basic_consume(
            queue.into(),
            tag.as_str().into(),
            BasicConsumeOptions {
                exclusive,
                ..BasicConsumeOptions::default()
            },
            FieldTable::default(),
        )
        .await
        .with_context(|| format!("cannot consume {queue}"))
}

/// The producer's part: the samples, with both confirms of each awaited in a window.
async fn producer_role(
    plan: Plan,
    channel: Publisher,
    data: Arc<Dataset>,
) -> anyhow::Result<RoleDone> {
    // The producer's own row picker and body writers, so the bytes are the producer's.
    let mut sampler = Sampler::new(Order::Random, None, data.len());
    let format = BodyFormat::of(plan.topology);
    let mut window = ConfirmWindow::new();
    let mut confirms: VecDeque<(u64, Confirm)> = VecDeque::with_capacity(2 * plan.window);
    let mut body = Vec::with_capacity(512);
    let (mut y_true_bytes, mut features_bytes) = (0u64, 0u64);
    let mut sent = Vec::with_capacity(usize::try_from(plan.samples).unwrap_or(0));
    let mut pacer = Pacer::new(plan.rate);
    let first_publish = Instant::now();
    for _ in 0..plan.samples {
        // Retire what is confirmed already; wait for the oldest only when the window is full.
        retire_confirmed(&mut window, &mut confirms, false).await?;
        if window.len() >= plan.window {
            retire_confirmed(&mut window, &mut confirms, true).await?;
        }
        // Paced as the producer paces.
        if let Some(at) = pacer.next_due(tokio::time::Instant::now()) {
            tokio::time::sleep_until(at).await;
        }
        pacer.sent();
        let id = uuid::Uuid::new_v4().to_string();
        let row = sampler.next_row();
        let sent_at_us = now_us();
        write_y_true(
            &mut body,
            format,
            &id,
            &data.target(row).into(),
            sent_at_us,
            None,
        )?;
        y_true_bytes += body.len() as u64;
        let y_true = channel
            .publish_json(&plan.y_true_queue, &body, Some(&id))
            .await?;
        write_features(&mut body, format, &id, data.row(row), sent_at_us, None)?;
        features_bytes += body.len() as u64;
        let features = channel
            .publish_json(&plan.features_queue, &body, Some(&id))
            .await?;
        sent.push((id, Instant::now()));
        let seq = window.push((), 2);
        confirms.extend([(seq, y_true), (seq, features)]);
    }
    while !window.is_empty() {
        retire_confirmed(&mut window, &mut confirms, true).await?;
    }
    channel.close().await;
    Ok(RoleDone::Producer {
        first_publish,
        y_true_bytes,
        features_bytes,
        sent,
    })
}

/// Records the confirms that are in (with `wait`, waits for the oldest first) and retires the
/// samples the window says are answered; a refused one fails the run.
async fn retire_confirmed(
    window: &mut ConfirmWindow<()>,
    confirms: &mut VecDeque<(u64, Confirm)>,
    wait: bool,
) -> anyhow::Result<()> {
    record_confirms(window, confirms, wait)
        .await
        .context("waiting for a publisher confirm")?;
    for published in window.take_answered() {
        ensure!(
            matches!(published, Published::Confirmed(())),
            "the broker refused a message"
        );
    }
    Ok(())
}

/// The model's part, through the services' own consume loop ([`run_consumer`], as the model runs
/// it): a `y_pred` for every `features` delivery, acked once the broker confirms it. It stops
/// (draining its confirms and acks) once it has handled every sample.
async fn model_role(
    plan: Plan,
    broker: BrokerConfig,
    consume: ConsumeConfig,
    prediction: f64,
    model_version: String,
) -> anyhow::Result<RoleDone> {
    let done = CancellationToken::new();
    let mut handler = CeilingModel {
        y_pred_queue: plan.y_pred_queue.clone(),
        format: BodyFormat::of(plan.topology),
        prediction,
        model_version,
        body: Vec::with_capacity(256),
        handled: 0,
        samples: plan.samples,
        y_pred_bytes: 0,
        done: done.clone(),
    };
    let spec = ConsumerSpec {
        inputs: &[plan.features_queue.as_str()],
        topology: Topology::new(
            &broker,
            &[plan.features_queue.as_str(), plan.y_pred_queue.as_str()],
        ),
        consume,
        exclusive: false,
        service: "bench ceiling (model)",
    };
    let mut broker = Broker::new(
        broker,
        "bench ceiling (model)",
        unregistered_metrics(),
        Health::new(),
    );
    run_consumer(&mut broker, &spec, &mut handler, &done).await?;
    Ok(RoleDone::Model {
        y_pred_bytes: handler.y_pred_bytes,
    })
}

/// The model role's handler: no JSON parsed, no model run; the real prediction's body shape.
struct CeilingModel {
    y_pred_queue: String,
    format: BodyFormat,
    prediction: f64,
    model_version: String,
    body: Vec<u8>,
    handled: u64,
    samples: u64,
    y_pred_bytes: u64,
    done: CancellationToken,
}

impl MessageHandler for CeilingModel {
    async fn handle(
        &mut self,
        _input: usize,
        delivery: &Delivery,
    ) -> Result<Disposition, HandlerError> {
        let id = delivery
            .properties
            .message_id()
            .as_ref()
            .context("a features message without message_id")?
            .as_str();
        write_y_pred(
            &mut self.body,
            self.format,
            Some(id),
            &self.prediction.into(),
            None,
            &self.model_version,
            Some(now_us()),
            None,
        )
        .context("cannot encode y_pred")?;
        self.y_pred_bytes += self.body.len() as u64;
        self.handled += 1;
        if self.handled >= self.samples {
            self.done.cancel();
        }
        Ok(Disposition::Publish(Outgoing::json(
            &self.y_pred_queue,
            &self.body,
            Some(id),
        )))
    }

    async fn flush(&mut self) -> Result<(), HandlerError> {
        Ok(())
    }
}

/// The metric's part: takes every `y_true` and `y_pred`, acks each batch with `multiple`.
async fn metric_role(
    plan: Plan,
    channel: Channel,
    consumers: Vec<Consumer>,
    acked: Arc<AtomicU64>,
) -> anyhow::Result<RoleDone> {
    let mut deliveries = futures_util::stream::select_all(
        consumers
            .into_iter()
            .enumerate()
            .map(|(kind, consumer)| consumer.map(move |delivery| (kind, delivery))),
    );
    let mut counts = [0u64; 2];
    let batch_limit = usize::from(plan.prefetch);
    // Ids with one of their two messages in; the second completes the sample.
    let mut halves: HashSet<String> = HashSet::new();
    let mut both_in = Vec::with_capacity(usize::try_from(plan.samples).unwrap_or(0));
    // Tags count per channel across both consumers, and `select_all` may hand over one consumer's
    // later tag before the other's earlier one: an ack with `multiple` covers every tag up to it,
    // so only a tag above the highest acked is acked (acking a covered tag again is a channel
    // error, "unknown delivery tag").
    let mut acked_to = 0;
    loop {
        let mut next = Some(deliveries.next().await);
        let mut taken = 0;
        let mut top_tag = 0;
        while let Some(item) = next.take() {
            let (kind, delivery) = item.context("the broker cancelled a consumer")?;
            let delivery = delivery?;
            counts[kind] += 1;
            if let Some(id) = delivery.properties.message_id() {
                let id = id.as_str();
                if halves.remove(id) {
                    both_in.push((id.to_owned(), Instant::now()));
                } else {
                    halves.insert(id.to_owned());
                }
            }
            top_tag = top_tag.max(delivery.delivery_tag);
            taken += 1;
            if taken < batch_limit {
                next = deliveries.next().now_or_never();
            }
        }
        if top_tag > acked_to {
            channel
                .basic_ack(top_tag, BasicAckOptions { multiple: true })
                .await?;
            acked_to = top_tag;
        }
        acked.fetch_add(taken as u64, Ordering::Relaxed);
        if counts.iter().all(|count| *count >= plan.samples) {
            let last_ack = Instant::now();
            let _ = channel.close(200, "done".into()).await;
            return Ok(RoleDone::Metric { last_ack, both_in });
        }
    }
}

/// Closes a connection, briefly.
async fn close(connection: &Connection) {
    let _ = tokio::time::timeout(Duration::from_secs(2), connection.close(200, "bye".into())).await;
}
