//! The session supervisor seen from outside: an error no retry can fix stops a service at once
//! with an error naming the setting, instead of a reconnect loop.

use crate::helpers::*;
use lapin::options::QueueDeclareOptions;
use lapin::types::FieldTable;
use std::time::Duration;

/// The course's Python code declares `features` with `queue_declare(queue=name)`: not durable.
/// Under the default TOPOLOGY our declare is refused; each service must stop after one connection
/// with an error that names TOPOLOGY=course. (The producer used to loop: ~700 connections in 10 s.)
#[tokio::test(flavor = "multi_thread")]
async fn a_queue_declared_with_other_arguments_stops_each_service_with_the_setting_named() {
    let url = shared_amqp_url();
    let queues = Queues::unique("foreign");
    let connection = connect(&url).await;
    let channel = connection.create_channel().await.expect("channel");
    channel
        .queue_declare(
            queues.features.as_str().into(),
            QueueDeclareOptions::default(),
            FieldTable::default(),
        )
        .await
        .expect("declare features as the course code does");

    let dir = tempfile::tempdir().expect("tempdir");
    let mut env = queues.env();
    env.push(("AMQP_URL".into(), url.clone()));
    env.push(("RECONNECT_MAX_DELAY_MS".into(), "1000".into()));
    let mut producer_env = env.clone();
    producer_env.push(("COUNT".into(), "10".into()));
    let mut features = spawn_service("features", producer_env, dir.path());
    let mut model = spawn_service("model", env, dir.path());

    for service in [&mut features, &mut model] {
        let status = service.wait_exit(Duration::from_secs(20));
        let stderr = service.stderr();
        let status = status
            .unwrap_or_else(|| panic!("{} still running after 20 s:\n{stderr}", service.name));
        assert!(!status.success(), "{} exited 0:\n{stderr}", service.name);
        assert!(
            stderr.contains("already exists with other arguments")
                && stderr.contains("TOPOLOGY=course"),
            "{}:\n{stderr}",
            service.name
        );
        let connections = stderr.matches("connected to the broker").count();
        assert_eq!(connections, 1, "{}:\n{stderr}", service.name);
    }
    let _ = channel
        .queue_delete(queues.features.as_str().into(), Default::default())
        .await;
    delete_queues(&url, &queues).await;
    let _ = connection.close(200, "bye".into()).await;
}
