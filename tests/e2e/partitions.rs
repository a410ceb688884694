//! Partitioned streams on one broker: a service started with another `PARTITIONS` stops naming it,
//! samples land in the partition of their hash, a message in the wrong partition is dead-lettered,
//! and `PARTITIONS=1` declares exactly the queues it always did.

use crate::helpers::*;
use lapin::options::{BasicAckOptions, BasicGetOptions, QueueDeclareOptions};
use lapin::types::FieldTable;
use pipeline::broker::publisher::header_str;
use pipeline::broker::topology::{REASON_HEADER, fanout_exchange};
use pipeline::partition::{Partitions, marker_queue};
use std::collections::{BTreeMap, HashSet};
use std::time::{Duration, Instant};

/// Deletes every queue and exchange a partitioned run of `queues` may declare (best effort).
async fn delete_partitioned(url: &str, queues: &Queues, partitions: Partitions) {
    let connection = connect(url).await;
    for stream in [&queues.features, &queues.y_true, &queues.y_pred] {
        let mut names = vec![marker_queue(stream)];
        for queue in partitions.queues(stream) {
            names.push(dead_letter_queue(&queue));
            names.push(queue);
        }
        for name in names {
            if let Ok(channel) = connection.create_channel().await {
                let _ = channel
                    .queue_delete(name.as_str().into(), Default::default())
                    .await;
            }
        }
        for queue in partitions.queues(stream) {
            if let Ok(channel) = connection.create_channel().await {
                let _ = channel
                    .exchange_delete(fanout_exchange(&queue).as_str().into(), Default::default())
                    .await;
            }
        }
    }
    let _ = connection.close(200, "bye".into()).await;
}

/// Whether `queue` exists (a passive declare on a channel of its own: a missing queue closes it).
async fn exists(url: &str, queue: &str) -> bool {
    let connection = connect(url).await;
    let channel = connection.create_channel().await.expect("channel");
    let found = channel
        .queue_declare(
            queue.into(),
            QueueDeclareOptions {
                passive: true,
                ..Default::default()
            },
            FieldTable::default(),
        )
        .await
        .is_ok();
    let _ = connection.close(200, "bye".into()).await;
    found
}

fn env(url: &str, queues: &Queues, partitions: u32) -> Vec<(String, String)> {
    Env::new(url, queues)
        .set("PARTITIONS", partitions)
        .set("RECONNECT_MAX_DELAY_MS", 1000)
        .pairs()
        .to_vec()
}

#[tokio::test(flavor = "multi_thread")]
async fn another_partition_count_stops_a_service_naming_partitions() {
    const COUNT: u32 = 100;
    let url = shared_amqp_url();
    let queues = Queues::unique("partcount");
    let work = tempfile::tempdir().unwrap();
    let four = Partitions::new(4).unwrap();
    // The producer declares the streams for 4 and queues 100 samples.
    let mut producer_env = env(&url, &queues, 4);
    producer_env.extend([
        ("COUNT".to_owned(), COUNT.to_string()),
        ("RATE".to_owned(), "0".to_owned()),
    ]);
    let mut features = spawn_service("features", producer_env, work.path());
    let exit = features.wait_exit(Duration::from_secs(60));
    assert!(
        exit.is_some_and(|status| status.success()),
        "features: {exit:?}\n{}",
        features.stderr()
    );

    // A model started with 3 stops within 10 s, naming PARTITIONS and both counts.
    let dir = work.path().join("model");
    std::fs::create_dir_all(&dir).unwrap();
    let started = Instant::now();
    let mut model = spawn_service("model", env(&url, &queues, 3), &dir);
    let exit = model.wait_exit(Duration::from_secs(10));
    let took = started.elapsed();
    let stderr = model.stderr();
    eprintln!("model with PARTITIONS=3 exited {exit:?} after {took:?}:\n{stderr}");
    assert!(
        exit.is_some_and(|status| !status.success()),
        "the model did not stop: {exit:?}"
    );
    assert!(
        stderr.contains("PARTITIONS=3") && stderr.contains("PARTITIONS=4"),
        "{stderr}"
    );
    // Nothing consumed: all 100 samples still wait in the features partitions.
    let depths = queue_depths(&url, &four.queues(&queues.features)).await;
    eprintln!("features partitions after the refused model: {depths:?}");
    assert_eq!(depths.values().sum::<u32>(), COUNT, "{depths:?}");
    assert!(
        !exists(&url, &format!("{}.p0", queues.y_pred)).await,
        "the refused model declared y_pred partitions"
    );

    // A producer with 3 stops the same way, having published nothing.
    let dir = work.path().join("features3");
    std::fs::create_dir_all(&dir).unwrap();
    let mut producer_env = env(&url, &queues, 3);
    producer_env.push(("COUNT".to_owned(), "10".to_owned()));
    let mut features = spawn_service("features", producer_env, &dir);
    let exit = features.wait_exit(Duration::from_secs(10));
    let stderr = features.stderr();
    assert!(exit.is_some_and(|status| !status.success()), "{exit:?}");
    assert!(
        stderr.contains("PARTITIONS=3, but the queues of stream"),
        "{stderr}"
    );
    let depths = queue_depths(&url, &four.queues(&queues.features)).await;
    assert_eq!(depths.values().sum::<u32>(), COUNT, "{depths:?}");
    delete_partitioned(&url, &queues, four).await;
}

/// Takes every message of `queue`: (ids from `message_id`, reasons of dead letters).
async fn drain(url: &str, queue: &str) -> Vec<(String, Option<String>)> {
    let connection = connect(url).await;
    let channel = connection.create_channel().await.expect("channel");
    let mut taken = Vec::new();
    while let Some(message) = channel
        .basic_get(queue.into(), BasicGetOptions::default())
        .await
        .expect("basic_get")
    {
        let id = message
            .properties
            .message_id()
            .as_ref()
            .map(|id| id.as_str().to_owned())
            .unwrap_or_default();
        let headers = message.properties.headers().clone().unwrap_or_default();
        let reason = header_str(&headers, REASON_HEADER).map(str::to_owned);
        taken.push((id, reason));
        message.ack(BasicAckOptions::default()).await.expect("ack");
    }
    let _ = connection.close(200, "bye".into()).await;
    taken
}

#[tokio::test(flavor = "multi_thread")]
async fn samples_go_to_the_partition_of_their_hash_and_strays_are_dead_lettered() {
    const COUNT: usize = 400;
    let url = shared_amqp_url();
    let queues = Queues::unique("partroute");
    let work = tempfile::tempdir().unwrap();
    let four = Partitions::new(4).unwrap();
    let model = spawn_service("model", env(&url, &queues, 4), work.path());
    wait_healthy(&model, Duration::from_secs(30));

    // A stray: an id of partition 1 put into features.p2 by hand, and one that belongs there.
    let stray = (0..)
        .map(|n| format!("stray-{n}"))
        .find(|id| four.of(id) == 1)
        .unwrap();
    let right = (0..)
        .map(|n| format!("right-{n}"))
        .find(|id| four.of(id) == 2)
        .unwrap();
    let connection = connect(&url).await;
    let features_p2 = four.queue(&queues.features, 2);
    for id in [&stray, &right] {
        let body = format!(
            "{{\"id\":\"{id}\",\"features\":[0.01,0.02,0.03,0.04,0.05,0.06,0.07,0.08,0.09,0.1]}}"
        );
        publish_raw(&connection, &features_p2, body.as_bytes(), Some(id)).await;
    }
    let _ = connection.close(200, "bye".into()).await;

    let dir = work.path().join("features");
    std::fs::create_dir_all(&dir).unwrap();
    let mut producer_env = env(&url, &queues, 4);
    producer_env.extend([
        ("COUNT".to_owned(), COUNT.to_string()),
        ("RATE".to_owned(), "0".to_owned()),
    ]);
    let mut features = spawn_service("features", producer_env, &dir);
    assert!(
        features
            .wait_exit(Duration::from_secs(60))
            .is_some_and(|status| status.success()),
        "{}",
        features.stderr()
    );
    // Every prediction made: COUNT, and the right one of the two by hand.
    let y_pred = four.queues(&queues.y_pred);
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let predicted: u32 = queue_depths(&url, &y_pred).await.values().sum();
        if predicted as usize == COUNT + 1 {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "{predicted} predictions of {}\n{}",
            COUNT + 1,
            model.stderr()
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }

    let mut per_partition = BTreeMap::new();
    for stream in [&queues.y_true, &queues.y_pred] {
        let mut seen = HashSet::new();
        for k in four.all() {
            let taken = drain(&url, &four.queue(stream, k)).await;
            for (id, _) in &taken {
                assert_eq!(four.of(id), k, "{id} in {stream}.p{k}");
                assert!(seen.insert(id.clone()), "{id} twice in {stream}");
            }
            per_partition
                .entry(stream.clone())
                .or_insert_with(Vec::new)
                .push(taken.len());
        }
        let expected = if stream == &queues.y_pred {
            COUNT + 1
        } else {
            COUNT
        };
        assert_eq!(seen.len(), expected, "ids in {stream}");
        assert_eq!(seen.contains(&right), stream == &queues.y_pred);
        assert!(!seen.contains(&stray), "the stray reached {stream}");
    }
    eprintln!("messages per partition: {per_partition:?}");
    let dead = drain(&url, &dead_letter_queue(&features_p2)).await;
    eprintln!("{features_p2}.dlq: {dead:?}");
    assert_eq!(dead, [(stray.clone(), Some("wrong_partition".to_owned()))]);
    drop(model);
    delete_partitioned(&url, &queues, four).await;
}

#[tokio::test(flavor = "multi_thread")]
async fn one_partition_declares_todays_queues() {
    let url = shared_amqp_url();
    let queues = Queues::unique("partone");
    let work = tempfile::tempdir().unwrap();
    let model = spawn_service("model", env(&url, &queues, 1), work.path());
    wait_healthy(&model, Duration::from_secs(30));
    drop(model);
    for queue in [&queues.features, &queues.y_pred] {
        assert!(exists(&url, queue).await, "{queue} missing");
        assert!(exists(&url, &dead_letter_queue(queue)).await);
        for other in [format!("{queue}.p0"), marker_queue(queue)] {
            assert!(
                !exists(&url, &other).await,
                "{other} declared with PARTITIONS=1"
            );
        }
    }
    delete_queues(&url, &queues).await;
}
