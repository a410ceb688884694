//! Models over the network (`MODEL_URL`): two model replicas read the artifact from the trainer's
//! `GET /model` instead of a shared folder. A new artifact written to the trainer's `MODEL_PATH`
//! reaches both; with the trainer gone they keep serving and say so; every id once.

use crate::helpers::*;
use std::time::Duration;

fn served(service: &Service, version: &str) -> bool {
    service
        .metrics()
        .get(&format!("pipeline_model_served{{version=\"{version}\"}}"))
        .copied()
        == Some(1.0)
}

#[tokio::test(flavor = "multi_thread")]
async fn replicas_follow_the_trainers_model_over_http_and_ride_out_its_absence() {
    const SAMPLES: u64 = 3000;
    let url = shared_amqp_url();
    let work = tempfile::tempdir().unwrap();
    let model_path = work.path().join("models/model.json");
    std::fs::create_dir_all(model_path.parent().unwrap()).unwrap();
    train(&repo_root().join("data/diabetes.csv"), &model_path, "v1");

    let options = Options::new(url.clone(), SAMPLES).rate(150.0);
    // The trainer first: it serves GET /model. Its queues are this run's.
    let queues = Queues::unique("modelurl");
    let mut trainer_env = Env::new(&url, &queues)
        .set("MODEL_PATH", model_path.display())
        .set("TRAIN_DIR", work.path().join("train").display())
        .set("RETRAIN_EVERY", 0)
        .pairs()
        .to_vec();
    trainer_env.push(("RECONNECT_MAX_DELAY_MS".into(), "1000".into()));
    let trainer_dir = work.path().join("trainer");
    std::fs::create_dir_all(&trainer_dir).unwrap();
    let mut trainer = spawn_service("trainer", trainer_env, &trainer_dir);
    wait_healthy(&trainer, Duration::from_secs(30));
    let model_url = format!("http://{}/model", trainer.http_addr);

    let mut run = Pipeline::start_consumers_on(
        queues,
        options
            .env("MODEL_URL", &model_url)
            .env("MODEL_POLL_MS", "200"),
    );
    let second = run.extra_service("model", &[]);
    for replica in [&run.model, &second] {
        wait_healthy(replica, Duration::from_secs(30));
        assert!(served(replica, "v1"), "{}", replica.stderr());
    }
    run.start_features();
    run.wait_rows(500, Duration::from_secs(60));

    // A new artifact at the trainer's MODEL_PATH reaches both replicas over HTTP.
    train(&repo_root().join("data/diabetes.csv"), &model_path, "v2");
    assert!(
        wait_until(Duration::from_secs(10), || served(&run.model, "v2")
            && served(&second, "v2")),
        "v2 did not reach both replicas\n{}\n{}",
        run.model.stderr(),
        second.stderr()
    );
    eprintln!("v2 served by both replicas over {model_url}");

    // The trainer goes away: the replicas keep v2 and say so; back, the note goes.
    trainer.kill();
    assert!(
        wait_until(Duration::from_secs(10), || run
            .model
            .get("/healthz")
            .is_some_and(
                |(status, body)| status == 200 && body.contains("cannot fetch the model artifact")
            )),
        "no note on /healthz: {:?}",
        run.model.get("/healthz")
    );
    let (_, body) = run.model.get("/healthz").unwrap();
    eprintln!("replica /healthz with the trainer down:\n{body}");
    assert!(body.contains("serving v2"), "{body}");
    let rows_before = run.rows().len();
    run.wait_rows(rows_before + 300, Duration::from_secs(60));
    assert!(served(&run.model, "v2"));
    trainer.restart(&trainer_dir);
    assert!(
        wait_until(Duration::from_secs(30), || run
            .model
            .get("/healthz")
            .is_some_and(|(_, body)| !body.contains("cannot fetch"))),
        "the note stayed: {:?}",
        run.model.get("/healthz")
    );

    run.wait_rows(SAMPLES as usize, Duration::from_secs(120));
    std::thread::sleep(Duration::from_millis(500));
    let rows = run.rows();
    assert_exactly_once(&rows, SAMPLES as usize);
    let versions: std::collections::BTreeMap<&str, usize> =
        rows.iter().fold(Default::default(), |mut count, row| {
            *count.entry(row.model_version.as_str()).or_default() += 1;
            count
        });
    eprintln!("rows by version: {versions:?}");
    assert!(versions.get("v2").copied().unwrap_or(0) > 0, "{versions:?}");
    assert!(
        versions.keys().all(|v| *v == "v1" || *v == "v2"),
        "{versions:?}"
    );
    drop(second);
    trainer.kill();
    run.stop_services();
    delete_queues(&url, &run.queues).await;
}
