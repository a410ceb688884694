//! `PARTITIONS` on the shared broker: a service started with another partition count stops naming
//! both counts before it consumes anything; every sample's `y_true` and `y_pred` land in the
//! partition of its id's hash; a `features` message found in a partition its id does not hash to
//! is dead-lettered `wrong_partition` and never predicted; `PARTITIONS=1` declares exactly the
//! queues it always did, and no partition queue nor marker.

use crate::helpers::*;
use lapin::options::{
    BasicAckOptions, BasicGetOptions, ExchangeDeclareOptions, QueueDeclareOptions,
};
use lapin::types::FieldTable;
use lapin::{Connection, ErrorKind, ExchangeKind};
use pipeline::audit::audit_queue;
use pipeline::broker::publisher::header_str;
use pipeline::broker::topology::{REASON_HEADER, fanout_exchange, training_queue};
use pipeline::dataset::Dataset;
use pipeline::messages::{BodyFormat, now_us, write_features};
use pipeline::partition::{Partitions, WRONG_PARTITION, marker_queue};
use std::collections::{BTreeMap, HashSet};
use std::time::{Duration, Instant};

/// Every queue a run on `queues` may declare under `partitions` (and under one partition, in case
/// a service fell back to today's names): the partition queues and their `.dlq`, the markers, the
/// trainer's copies and their `.dlq`.
fn every_queue(queues: &Queues, partitions: Partitions) -> Vec<String> {
    let mut names = Vec::new();
    for stream in [&queues.features, &queues.y_true, &queues.y_pred] {
        let mut own = Partitions::ONE.queues(stream);
        own.extend(partitions.queues(stream));
        for queue in own {
            names.push(dead_letter_queue(&queue));
            names.push(queue);
        }
        if stream == &queues.y_true {
            for queue in Partitions::ONE
                .queues(stream)
                .iter()
                .chain(&partitions.queues(stream))
            {
                names.push(dead_letter_queue(&audit_queue(queue)));
                names.push(audit_queue(queue));
            }
        }
        names.push(marker_queue(stream));
        names.push(training_queue(stream));
        names.push(dead_letter_queue(&training_queue(stream)));
    }
    names.sort();
    names.dedup();
    names
}

/// Every fanout exchange a run on `queues` may declare (one per partition queue of each stream).
fn every_exchange(queues: &Queues, partitions: Partitions) -> Vec<String> {
    let mut names = Vec::new();
    for stream in [&queues.features, &queues.y_true, &queues.y_pred] {
        names.push(fanout_exchange(stream));
        names.extend(
            partitions
                .queues(stream)
                .iter()
                .map(|queue| fanout_exchange(queue)),
        );
    }
    names.sort();
    names.dedup();
    names
}

/// Deletes every queue and exchange of [`every_queue`] and [`every_exchange`] (a missing one is
/// fine; a refused delete closes its channel, so each gets a channel of its own). The services
/// must be stopped first: a live one would declare its queues again.
async fn delete_partitioned(url: &str, queues: &Queues, partitions: Partitions) {
    let Ok(connection) = testkit::connect(url, "e2e partitions (cleanup)").await else {
        return;
    };
    for queue in every_queue(queues, partitions) {
        if let Ok(channel) = connection.create_channel().await {
            let _ = channel
                .queue_delete(queue.as_str().into(), Default::default())
                .await;
            let _ = channel.close(200, "bye".into()).await;
        }
    }
    for exchange in every_exchange(queues, partitions) {
        if let Ok(channel) = connection.create_channel().await {
            let _ = channel
                .exchange_delete(exchange.as_str().into(), Default::default())
                .await;
            let _ = channel.close(200, "bye".into()).await;
        }
    }
    let _ = connection.close(200, "bye".into()).await;
}

/// Deletes everything, then asserts nothing of it is left on the broker.
pub(crate) async fn clean_up(url: &str, queues: &Queues, partitions: Partitions) {
    delete_partitioned(url, queues, partitions).await;
    let connection = connect(url).await;
    let mut left = Vec::new();
    for queue in every_queue(queues, partitions) {
        if queue_exists(&connection, &queue).await {
            left.push(queue);
        }
    }
    for exchange in every_exchange(queues, partitions) {
        if exchange_exists(&connection, &exchange).await {
            left.push(exchange);
        }
    }
    let _ = connection.close(200, "bye".into()).await;
    assert!(left.is_empty(), "left on the broker: {left:?}");
}

/// Cleans up after a test that panics (a passing test calls [`clean_up`] itself). Made before the
/// services, so it is dropped after them: they are killed before their queues are deleted.
struct Guard {
    url: String,
    queues: Queues,
    partitions: Partitions,
}

impl Drop for Guard {
    fn drop(&mut self) {
        if !std::thread::panicking() {
            return;
        }
        clean_up_on_a_thread(|| delete_partitioned(&self.url, &self.queues, self.partitions));
    }
}

/// Whether the queue exists: a passive declare on a channel of its own (a missing queue closes
/// the channel with 404). Any other refusal fails the test.
async fn queue_exists(connection: &Connection, queue: &str) -> bool {
    let channel = connection.create_channel().await.expect("channel");
    let declared = channel
        .queue_declare(
            queue.into(),
            QueueDeclareOptions {
                passive: true,
                ..Default::default()
            },
            FieldTable::default(),
        )
        .await;
    match declared {
        Ok(_) => {
            let _ = channel.close(200, "bye".into()).await;
            true
        }
        Err(err) if is_not_found(&err) => false,
        Err(err) => panic!("passive declare of queue {queue}: {err}"),
    }
}

/// Whether the exchange exists (as [`queue_exists`]).
async fn exchange_exists(connection: &Connection, exchange: &str) -> bool {
    let channel = connection.create_channel().await.expect("channel");
    let declared = channel
        .exchange_declare(
            exchange.into(),
            ExchangeKind::Fanout,
            ExchangeDeclareOptions {
                passive: true,
                ..Default::default()
            },
            FieldTable::default(),
        )
        .await;
    match declared {
        Ok(()) => {
            let _ = channel.close(200, "bye".into()).await;
            true
        }
        Err(err) if is_not_found(&err) => false,
        Err(err) => panic!("passive declare of exchange {exchange}: {err}"),
    }
}

fn is_not_found(err: &lapin::Error) -> bool {
    matches!(err.kind(), ErrorKind::ProtocolError(amqp) if amqp.get_id() == 404)
}

/// The settings of a service of this run, with `PARTITIONS=partitions`.
pub(crate) fn env(url: &str, queues: &Queues, partitions: u32) -> Env {
    Env::new(url, queues)
        .set("PARTITIONS", partitions)
        .set("RECONNECT_MAX_DELAY_MS", 1000)
}

/// Starts `name` with `env`, its stderr in a folder of its own under `work`.
pub(crate) fn start(name: &'static str, env: Env, work: &std::path::Path, folder: &str) -> Service {
    let dir = work.join(folder);
    std::fs::create_dir_all(&dir).expect("service dir");
    spawn_service(name, env.pairs().to_vec(), &dir)
}

/// Runs the producer to completion (it must exit 0 within 60 s).
pub(crate) fn produce(mut features: Service) {
    let exit = features.wait_exit(Duration::from_secs(60));
    assert!(
        exit.is_some_and(|status| status.success()),
        "features exited {exit:?}\n{}",
        features.stderr_tail(40)
    );
}

/// Sum of the depths of `queues`.
async fn total_depth(url: &str, queues: &[String]) -> u32 {
    queue_depths(url, queues).await.values().sum()
}

/// Waits until the depths of `queues` sum to `n`, panicking with `service`'s log after `timeout`.
async fn wait_depth(url: &str, queues: &[String], n: u32, timeout: Duration, service: &Service) {
    let deadline = Instant::now() + timeout;
    loop {
        let total = total_depth(url, queues).await;
        if total == n {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "{total} messages in {queues:?} after {timeout:?}, expected {n}\n{}",
            service.stderr_tail(40)
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// One message taken from a queue.
#[derive(Debug)]
struct Taken {
    /// The `message_id` property, else the body's `"id"`; the two must agree when both are set.
    id: String,
    /// `x-pipeline-reason`, on a dead letter.
    reason: Option<String>,
}

/// Takes (and acks) every message of `queue` with `basic_get`.
async fn drain(connection: &Connection, queue: &str) -> Vec<Taken> {
    let channel = connection.create_channel().await.expect("channel");
    let mut taken = Vec::new();
    while let Some(message) = channel
        .basic_get(queue.into(), BasicGetOptions::default())
        .await
        .unwrap_or_else(|e| panic!("basic_get on {queue}: {e}"))
    {
        let property = message
            .properties
            .message_id()
            .as_ref()
            .map(|id| id.as_str().to_owned());
        let body = serde_json::from_slice::<serde_json::Value>(&message.data)
            .ok()
            .and_then(|body| body.get("id")?.as_str().map(str::to_owned));
        if let (Some(property), Some(body)) = (&property, &body) {
            assert_eq!(property, body, "message_id and body id differ in {queue}");
        }
        let id = property
            .or(body)
            .unwrap_or_else(|| panic!("a message without an id in {queue}"));
        let headers = message.properties.headers().clone().unwrap_or_default();
        let reason = header_str(&headers, REASON_HEADER).map(str::to_owned);
        message.ack(BasicAckOptions::default()).await.expect("ack");
        taken.push(Taken { id, reason });
    }
    let _ = channel.close(200, "bye".into()).await;
    taken
}

/// The line of `stderr` that names the partition counts (for the test's output).
fn said(stderr: &str) -> &str {
    stderr
        .lines()
        .find(|line| line.contains("but the queues of stream"))
        .unwrap_or("(no line names the partition counts)")
}

/// The start of the message a service prints when its `PARTITIONS` differs from the streams'.
fn mismatch(stream: &str, ours: u32, theirs: u32) -> String {
    format!(
        "PARTITIONS={ours}, but the queues of stream `{stream}` were declared with PARTITIONS={theirs}"
    )
}

/// Starts `name` with `env` (`PARTITIONS=3`) on streams declared with 4 whose `features`
/// partitions hold `count` samples: it must stop with an error within 10 s that names both counts,
/// and leave the samples where they are.
async fn refused_start(
    name: &'static str,
    env: Env,
    work: &std::path::Path,
    url: &str,
    queues: &Queues,
    count: u32,
) -> Service {
    let started = Instant::now();
    let mut service = start(name, env, work, &format!("{name}3"));
    let exit = service.wait_exit(Duration::from_secs(10));
    let took = started.elapsed();
    let stderr = service.stderr();
    eprintln!(
        "{name} with PARTITIONS=3 exited {exit:?} after {took:?}: {}",
        said(&stderr)
    );
    assert!(
        exit.is_some_and(|status| !status.success()),
        "{name} with PARTITIONS=3 did not stop with an error within 10 s: {exit:?}\n{stderr}"
    );
    assert!(
        stderr.contains(&mismatch(&queues.features, 3, 4)),
        "{stderr}"
    );
    let features = Partitions::new(4).unwrap().queues(&queues.features);
    let depths = queue_depths(url, &features).await;
    eprintln!("features partitions after the refused {name}: {depths:?}");
    assert_eq!(depths.values().sum::<u32>(), count, "{depths:?}");
    service
}

#[tokio::test(flavor = "multi_thread")]
async fn another_partition_count_stops_a_service_naming_partitions() {
    const COUNT: u32 = 100;
    let url = shared_amqp_url();
    let queues = Queues::unique("partcount");
    let four = Partitions::new(4).unwrap();
    let _guard = Guard {
        url: url.clone(),
        queues: queues.clone(),
        partitions: four,
    };
    let work = tempfile::tempdir().unwrap();

    // The producer declares the streams for 4 and queues its 100 samples.
    produce(start(
        "features",
        env(&url, &queues, 4).set("COUNT", COUNT).set("RATE", 0),
        work.path(),
        "features4",
    ));
    let features = four.queues(&queues.features);
    let y_true = four.queues(&queues.y_true);
    let depths = queue_depths(&url, &features).await;
    eprintln!("features partitions after the producer with PARTITIONS=4: {depths:?}");
    assert_eq!(depths.values().sum::<u32>(), COUNT, "{depths:?}");
    assert_eq!(total_depth(&url, &y_true).await, COUNT);

    // A model started with 3 on the same names stops within 10 s, naming both counts, having
    // consumed nothing; nothing of the other layout is declared.
    let model = refused_start(
        "model",
        env(&url, &queues, 3),
        work.path(),
        &url,
        &queues,
        COUNT,
    )
    .await;
    let connection = connect(&url).await;
    for queue in [
        marker_queue(&queues.y_pred),
        Partitions::new(3).unwrap().queue(&queues.y_pred, 0),
    ] {
        assert!(
            !queue_exists(&connection, &queue).await,
            "the refused model declared {queue}"
        );
    }
    let _ = connection.close(200, "bye".into()).await;

    // A producer started with 3 stops the same way, having published nothing.
    let producer = refused_start(
        "features",
        env(&url, &queues, 3).set("COUNT", 10).set("RATE", 0),
        work.path(),
        &url,
        &queues,
        COUNT,
    )
    .await;
    assert_eq!(total_depth(&url, &y_true).await, COUNT, "y_true partitions");

    drop((model, producer));
    clean_up(&url, &queues, four).await;
}

#[tokio::test(flavor = "multi_thread")]
async fn samples_go_to_the_partition_of_their_hash() {
    const COUNT: u32 = 400;
    let url = shared_amqp_url();
    let queues = Queues::unique("parthash");
    let four = Partitions::new(4).unwrap();
    let _guard = Guard {
        url: url.clone(),
        queues: queues.clone(),
        partitions: four,
    };
    let work = tempfile::tempdir().unwrap();
    let model = start("model", env(&url, &queues, 4), work.path(), "model");
    wait_healthy(&model, Duration::from_secs(30));
    produce(start(
        "features",
        env(&url, &queues, 4).set("COUNT", COUNT).set("RATE", 0),
        work.path(),
        "features",
    ));
    let y_pred = four.queues(&queues.y_pred);
    wait_depth(&url, &y_pred, COUNT, Duration::from_secs(30), &model).await;
    // Every sample predicted, none left waiting, none dead-lettered.
    let features = four.queues(&queues.features);
    wait_depth(&url, &features, 0, Duration::from_secs(10), &model).await;
    let dead: Vec<String> = [&queues.features, &queues.y_true, &queues.y_pred]
        .iter()
        .flat_map(|stream| four.queues(stream))
        .map(|queue| dead_letter_queue(&queue))
        .collect();
    let dead_depths = queue_depths(&url, &dead).await;
    assert!(
        dead_depths.values().all(|depth| *depth == 0),
        "dead letters: {dead_depths:?}"
    );
    // The model is stopped before the queues are read: it must not add to them meanwhile.
    drop(model);

    let connection = connect(&url).await;
    let mut per_partition: BTreeMap<&str, Vec<usize>> = BTreeMap::new();
    let mut ids: BTreeMap<&str, HashSet<String>> = BTreeMap::new();
    for (label, stream) in [("y_true", &queues.y_true), ("y_pred", &queues.y_pred)] {
        let seen = ids.entry(label).or_default();
        for k in four.all() {
            let queue = four.queue(stream, k);
            let taken = drain(&connection, &queue).await;
            for message in &taken {
                assert_eq!(
                    four.of(&message.id),
                    k,
                    "{} (partition {}) found in {queue}",
                    message.id,
                    four.of(&message.id)
                );
                assert!(
                    seen.insert(message.id.clone()),
                    "{} twice in {label}",
                    message.id
                );
            }
            per_partition.entry(label).or_default().push(taken.len());
        }
    }
    let _ = connection.close(200, "bye".into()).await;
    eprintln!("messages per partition p0..p3: {per_partition:?}");
    for (label, seen) in &ids {
        assert_eq!(seen.len(), COUNT as usize, "distinct ids in {label}");
    }
    assert_eq!(ids["y_true"], ids["y_pred"], "y_true and y_pred ids differ");
    assert_eq!(per_partition["y_true"], per_partition["y_pred"]);
    assert!(
        per_partition["y_true"].iter().all(|n| *n > 0),
        "a partition got no sample: {per_partition:?}"
    );

    clean_up(&url, &queues, four).await;
}

#[tokio::test(flavor = "multi_thread")]
async fn a_message_in_the_wrong_partition_is_dead_lettered() {
    let url = shared_amqp_url();
    let queues = Queues::unique("partwrong");
    let four = Partitions::new(4).unwrap();
    let _guard = Guard {
        url: url.clone(),
        queues: queues.clone(),
        partitions: four,
    };
    let work = tempfile::tempdir().unwrap();
    let model = start("model", env(&url, &queues, 4), work.path(), "model");
    wait_healthy(&model, Duration::from_secs(30));

    let candidates = (0..).map(|n| format!("w{n}"));
    let wrong = candidates.clone().find(|id| four.of(id) != 2).unwrap();
    let right = candidates.clone().find(|id| four.of(id) == 2).unwrap();
    eprintln!(
        "{wrong} hashes to partition {}, {right} to partition {}",
        four.of(&wrong),
        four.of(&right)
    );
    // Both into features.p2 by hand, as the producer writes them: the native body and message_id.
    let data = Dataset::from_csv(&repo_root().join("data/diabetes.csv"), None).expect("dataset");
    let features_p2 = four.queue(&queues.features, 2);
    let connection = connect(&url).await;
    for (n, id) in [&wrong, &right].into_iter().enumerate() {
        let mut body = Vec::new();
        write_features(
            &mut body,
            BodyFormat::Native,
            id,
            data.row(n),
            now_us(),
            None,
        )
        .unwrap();
        publish_raw(&connection, &features_p2, &body, Some(id)).await;
    }

    let dlq = dead_letter_queue(&features_p2);
    let y_pred = four.queues(&queues.y_pred);
    wait_depth(
        &url,
        std::slice::from_ref(&dlq),
        1,
        Duration::from_secs(30),
        &model,
    )
    .await;
    wait_depth(&url, &y_pred, 1, Duration::from_secs(30), &model).await;
    wait_depth(
        &url,
        std::slice::from_ref(&features_p2),
        0,
        Duration::from_secs(10),
        &model,
    )
    .await;
    drop(model);

    let dead = drain(&connection, &dlq).await;
    eprintln!("{dlq}: {dead:?}");
    assert_eq!(dead.len(), 1, "{dead:?}");
    assert_eq!(dead[0].id, wrong);
    assert_eq!(dead[0].reason.as_deref(), Some(WRONG_PARTITION));
    let mut predicted = BTreeMap::new();
    for k in four.all() {
        let taken = drain(&connection, &four.queue(&queues.y_pred, k)).await;
        predicted.insert(k, taken.into_iter().map(|m| m.id).collect::<Vec<_>>());
    }
    let _ = connection.close(200, "bye".into()).await;
    eprintln!("y_pred by partition: {predicted:?}");
    let expected: BTreeMap<u32, Vec<String>> = four
        .all()
        .map(|k| (k, if k == 2 { vec![right.clone()] } else { vec![] }))
        .collect();
    assert_eq!(
        predicted, expected,
        "only {right} predicted, into y_pred.p2"
    );

    clean_up(&url, &queues, four).await;
}

#[tokio::test(flavor = "multi_thread")]
async fn one_partition_declares_todays_queues() {
    const COUNT: u32 = 10;
    let url = shared_amqp_url();
    let queues = Queues::unique("partone");
    let _guard = Guard {
        url: url.clone(),
        queues: queues.clone(),
        partitions: Partitions::new(4).unwrap(),
    };
    let work = tempfile::tempdir().unwrap();
    let model = start("model", env(&url, &queues, 1), work.path(), "model");
    wait_healthy(&model, Duration::from_secs(30));
    produce(start(
        "features",
        env(&url, &queues, 1).set("COUNT", COUNT).set("RATE", 0),
        work.path(),
        "features",
    ));
    wait_depth(
        &url,
        std::slice::from_ref(&queues.y_pred),
        COUNT,
        Duration::from_secs(30),
        &model,
    )
    .await;
    drop(model);

    let connection = connect(&url).await;
    let mut found = BTreeMap::new();
    for stream in [&queues.features, &queues.y_true, &queues.y_pred] {
        for queue in [stream.clone(), dead_letter_queue(stream)] {
            found.insert(queue.clone(), queue_exists(&connection, &queue).await);
        }
        for queue in [
            format!("{stream}.p0"),
            dead_letter_queue(&format!("{stream}.p0")),
            marker_queue(stream),
        ] {
            found.insert(queue.clone(), queue_exists(&connection, &queue).await);
        }
    }
    for stream in [&queues.features, &queues.y_true] {
        for exchange in [
            fanout_exchange(stream),
            fanout_exchange(&format!("{stream}.p0")),
        ] {
            found.insert(
                exchange.clone(),
                exchange_exists(&connection, &exchange).await,
            );
        }
    }
    let _ = connection.close(200, "bye".into()).await;
    eprintln!("declared with PARTITIONS=1: {found:?}");
    let partitioned = |name: &str| name.contains(".p0") || name.ends_with(".partitions");
    for (name, exists) in &found {
        assert_eq!(
            *exists,
            !partitioned(name),
            "{name} {} with PARTITIONS=1",
            if *exists { "declared" } else { "missing" }
        );
    }
    let depths = queue_depths(&url, &[queues.features.clone(), queues.y_true.clone()]).await;
    eprintln!("depths with PARTITIONS=1: y_pred {COUNT}, {depths:?}");
    assert_eq!(depths[&queues.features], 0, "features not consumed");
    assert_eq!(depths[&queues.y_true], COUNT, "y_true");

    clean_up(&url, &queues, Partitions::new(4).unwrap()).await;
}
