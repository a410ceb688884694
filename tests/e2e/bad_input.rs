//! Bad input published straight into the queues in the middle of a valid stream: each message ends
//! in its dead-letter queue with the reason in a header, every valid sample is still joined, and
//! no service restarts.

use crate::helpers::*;
use lapin::options::{BasicAckOptions, BasicGetOptions};
use pipeline::broker::publisher::header_str;
use pipeline::broker::topology::REASON_HEADER;
use std::collections::HashMap;
use std::time::Duration;

const SAMPLES: usize = 1000;

fn vector(n: usize) -> String {
    let values: Vec<String> = (0..n).map(|i| format!("0.0{i}")).collect();
    values.join(",")
}

#[tokio::test(flavor = "multi_thread")]
async fn bad_messages_are_dead_lettered_and_the_stream_goes_on() {
    let url = shared_amqp_url();
    let run = Pipeline::start("bad", Options::new(url.clone(), SAMPLES as u64).rate(400.0));
    let q = run.queues.clone();
    run.wait_rows(100, Duration::from_secs(60));

    let nine = vector(9);
    let big = format!("[{}]", "1,".repeat(1 << 20));
    let mut cases: Vec<(&str, Vec<u8>, &str)> = vec![
        (&q.features, b"".to_vec(), "empty_body"),
        (&q.features, b"{\"id\":".to_vec(), "invalid_json"),
        (
            &q.features,
            b"{\"id\":\"b1\",\"feats\":[1]}".to_vec(),
            "wrong_shape",
        ),
        (
            &q.features,
            format!("{{\"id\":\"b2\",\"features\":[{}]}}", vector(3)).into_bytes(),
            "wrong_length",
        ),
        (
            &q.features,
            format!("{{\"id\":\"b3\",\"features\":[{}]}}", vector(11)).into_bytes(),
            "wrong_length",
        ),
        (
            &q.features,
            format!("{{\"id\":\"b4\",\"features\":[{nine},\"a\"]}}").into_bytes(),
            "wrong_shape",
        ),
        (
            &q.features,
            format!("{{\"id\":\"b5\",\"features\":[{nine},null]}}").into_bytes(),
            "wrong_shape",
        ),
        (
            &q.features,
            format!("{{\"id\":\"b6\",\"features\":[{nine},\"NaN\"]}}").into_bytes(),
            "wrong_shape",
        ),
        (
            &q.features,
            format!("{{\"id\":\"b7\",\"features\":[{nine},\"Infinity\"]}}").into_bytes(),
            "wrong_shape",
        ),
        (
            &q.features,
            format!("{{\"id\":\"b8\",\"features\":[{nine},\"-Infinity\"]}}").into_bytes(),
            "wrong_shape",
        ),
        (
            &q.features,
            format!("[{nine},NaN]").into_bytes(),
            "invalid_json",
        ),
        (
            &q.features,
            format!("[{nine},1e999]").into_bytes(),
            "non_finite",
        ),
        (&q.features, b"42".to_vec(), "wrong_shape"),
        (
            &q.features,
            format!("{{\"features\":[{}]}}", vector(10)).into_bytes(),
            "missing_id",
        ),
        (
            &q.features,
            format!("{{\"id\":\"\",\"features\":[{}]}}", vector(10)).into_bytes(),
            "missing_id",
        ),
        (&q.features, big.into_bytes(), "too_large"),
        (&q.features, vec![0xff, 0xfe, 0x00, b'['], "not_utf8"),
        (&q.y_true, b"\"abc\"".to_vec(), "wrong_shape"),
        (
            &q.y_true,
            b"{\"id\":\"b9\",\"y_true\":\"151\"}".to_vec(),
            "wrong_shape",
        ),
        (
            &q.y_true,
            b"{\"id\":\"b10\",\"y_true\":null}".to_vec(),
            "wrong_shape",
        ),
        (&q.y_true, b"{\"y_true\":1}".to_vec(), "missing_id"),
        (&q.y_pred, b"[1,2]".to_vec(), "wrong_shape"),
        (
            &q.y_pred,
            b"{\"id\":\"b11\",\"y_pred\":1,\"model_version\":\"bad version\"}".to_vec(),
            "wrong_shape",
        ),
    ];
    // A duplicate of a joined id with a different value: the first value wins.
    let joined = run.rows()[0].clone();
    let conflict = format!(
        "{{\"id\":\"{}\",\"y_true\":{}}}",
        joined.id,
        joined.y_true + 1000.0
    )
    .into_bytes();
    cases.push((&q.y_true, conflict, "conflicting_duplicate"));

    let connection = connect(&url).await;
    let mut expected: HashMap<String, (String, &str)> = HashMap::new();
    for (n, (queue, body, reason)) in cases.iter().enumerate() {
        let message_id = format!("bad-{n}");
        publish_raw(&connection, queue, body, Some(&message_id)).await;
        expected.insert(message_id, (dead_letter_queue(queue), reason));
    }

    run.wait_rows(SAMPLES, Duration::from_secs(120));
    std::thread::sleep(Duration::from_millis(500));
    assert_exactly_once(&run.rows(), SAMPLES);
    let original = run.rows().into_iter().find(|r| r.id == joined.id).unwrap();
    assert_eq!(
        original.y_true, joined.y_true,
        "the first value of a duplicated id wins"
    );

    // Every bad message sits in the dead-letter queue of its queue, with its reason.
    let channel = connection.create_channel().await.unwrap();
    let mut found: HashMap<String, (String, String)> = HashMap::new();
    for dlq in [&q.features, &q.y_true, &q.y_pred].map(|q| dead_letter_queue(q)) {
        while let Some(message) = channel
            .basic_get(dlq.as_str().into(), BasicGetOptions::default())
            .await
            .unwrap()
        {
            let id = message
                .properties
                .message_id()
                .as_ref()
                .map(|i| i.as_str().to_owned())
                .unwrap_or_default();
            let headers = message.properties.headers().clone().unwrap_or_default();
            let reason = header_str(&headers, REASON_HEADER)
                .unwrap_or("none")
                .to_owned();
            found.insert(id, (dlq.clone(), reason));
            message.ack(BasicAckOptions::default()).await.unwrap();
        }
    }
    for (id, (dlq, reason)) in &expected {
        assert_eq!(
            found.get(id),
            Some(&(dlq.clone(), reason.to_string())),
            "message {id}"
        );
    }
    assert_eq!(
        found.len(),
        expected.len(),
        "unexpected dead letters: {found:?}"
    );

    // The services took it all in their stride: still running, never reconnected.
    for service in [&run.model, &run.metric] {
        let metrics = service.metrics();
        assert_eq!(
            metrics.get("pipeline_broker_reconnects_total"),
            Some(&0.0),
            "{} reconnected",
            service.name
        );
    }
    let dead_lettered: f64 = run
        .model
        .metrics()
        .iter()
        .filter(|(name, _)| name.starts_with("pipeline_messages_dead_lettered_total"))
        .map(|(_, v)| v)
        .sum();
    assert_eq!(
        dead_lettered as usize,
        cases.iter().filter(|c| c.0 == q.features).count()
    );
    let mut run = run;
    assert!(run.model.is_running() && run.metric.is_running());
    assert_eq!(
        run.model.stderr().matches("dead-lettering").count(),
        dead_lettered as usize,
        "one WARN line per bad message"
    );
    let _ = connection.close(200, "bye".into()).await;
    assert_queues_empty(&url, &run.queues).await;
    run.stop_services();
    delete_queues(&url, &run.queues).await;
}
