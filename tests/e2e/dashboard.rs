//! The metric service's live dashboard in a real browser: headless Chromium driven through
//! WebDriver (chromedriver, `fantoccini`). After 500 samples on a private broker node the page
//! shows the pair count of `pipeline_pairs_total` and the CSV, the CSV's mean absolute error to
//! the digits it displays, charts holding their points, and, once the node is stopped, a
//! "disconnected" indicator. With `UPDATE_DOCS_SCREENSHOT=1` it saves its screenshot as
//! docs/dashboard.png (in the README).
//!
//! Needs `chromium` and `chromium-driver` (Debian), which scripts/test installs when missing.

use crate::broker_node::BrokerNode;
use crate::helpers::*;
use fantoccini::{Client, ClientBuilder, Locator};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

const SAMPLES: usize = 500;

/// chromedriver on a free port; killed when dropped.
struct Driver {
    child: Child,
    url: String,
}

impl Driver {
    fn start() -> Self {
        let port = free_port();
        let child = Command::new("chromedriver")
            .arg(format!("--port={port}"))
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("chromedriver (apt-get install chromium-driver; scripts/test installs it)");
        let addr = std::net::SocketAddr::from(([127, 0, 0, 1], port));
        assert!(
            wait_until(Duration::from_secs(20), || {
                std::net::TcpStream::connect(addr).is_ok()
            }),
            "chromedriver did not listen on {addr}"
        );
        Self {
            child,
            url: format!("http://{addr}"),
        }
    }
}

impl Drop for Driver {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

async fn browser(driver: &Driver, profile: &std::path::Path) -> Client {
    let mut capabilities = serde_json::Map::new();
    capabilities.insert(
        "goog:chromeOptions".into(),
        serde_json::json!({
            "args": [
                "--headless",
                "--no-sandbox",
                "--disable-gpu",
                "--disable-quic",
                "--no-first-run",
                "--disable-background-networking",
                "--disable-component-update",
                "--disable-sync",
                "--window-size=1400,900",
                format!("--user-data-dir={}", profile.display()),
            ]
        }),
    );
    ClientBuilder::native()
        .capabilities(capabilities)
        .connect(&driver.url)
        .await
        .expect("a Chromium session through chromedriver")
}

async fn text(client: &Client, id: &str) -> String {
    match client.find(Locator::Id(id)).await {
        Ok(element) => element.text().await.unwrap_or_default(),
        Err(_) => String::new(),
    }
}

/// Polls `id`'s text until `accept` takes it or `timeout` passes; returns the last text.
async fn wait_text(
    client: &Client,
    id: &str,
    timeout: Duration,
    accept: impl Fn(&str) -> bool,
) -> (bool, String) {
    let deadline = Instant::now() + timeout;
    loop {
        let value = text(client, id).await;
        if accept(&value) {
            return (true, value);
        }
        if Instant::now() > deadline {
            return (false, value);
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn the_dashboard_shows_the_csv_and_the_broker_going_away() {
    let mut node = BrokerNode::start("dashboard");
    // Paced over about 8 s, so the windowed-MAE chart has a line and pairs/s a figure.
    let run = Pipeline::start(
        "dashboard",
        Options::new(node.amqp_url(), SAMPLES as u64).rate(60.0),
    );
    run.wait_rows(SAMPLES, Duration::from_secs(120));
    let rows = run.rows();
    assert_eq!(rows.len(), SAMPLES);
    // One bad message: the dead-letter table shows it.
    let connection = connect(&node.amqp_url()).await;
    publish_raw(&connection, &run.queues.y_true, b"{not json", Some("bad-1")).await;
    let _ = connection.close(200, "bye".into()).await;
    let csv_mae = rows.iter().map(|r| r.absolute_error).sum::<f64>() / rows.len() as f64;

    let driver = Driver::start();
    let profile = tempfile::tempdir().unwrap();
    let client = browser(&driver, profile.path()).await;
    client
        .goto(&format!("http://{}/", run.metric.http_addr))
        .await
        .unwrap();

    // Pairs: the page, the counter and the CSV agree.
    let (shown, pairs) = wait_text(&client, "pairs", Duration::from_secs(20), |t| {
        t.replace(',', "") == SAMPLES.to_string()
    })
    .await;
    assert!(shown, "the page shows {pairs:?} pairs, not {SAMPLES}");
    assert_eq!(
        run.metric.metrics().get("pipeline_pairs_total"),
        Some(&(SAMPLES as f64))
    );
    assert_eq!(text(&client, "broker").await, "connected");
    let y_true = run.queues.y_true.clone();
    let (shown, dead_letters) = wait_text(&client, "dead-letters", Duration::from_secs(10), |t| {
        t.contains(&y_true) && t.split_whitespace().last() == Some("1")
    })
    .await;
    assert!(shown, "dead-letter table: {dead_letters:?}");

    // MAE: the CSV's mean, to the digits shown.
    let mae_text = text(&client, "mae-all").await;
    let digits = mae_text.split('.').nth(1).map_or(0, str::len);
    assert!(digits >= 2, "MAE shown as {mae_text:?}");
    assert_eq!(mae_text, format!("{csv_mae:.digits$}"), "CSV MAE {csv_mae}");

    // Charts: uPlot holds the points it drew.
    let counts = client
        .execute(
            "const c = window.dashboard.charts; return [c.mae.data[0].length, \
             c.errors.data[1].reduce((a, b) => a + b, 0), c.scatter.data[0].length, \
             c.scatter.data[1].filter((y) => y !== null).length, \
             c.mae.series.length - 1];",
            vec![],
        )
        .await
        .unwrap();
    let counts: Vec<u64> = serde_json::from_value(counts).unwrap();
    let [
        history_points,
        histogram_total,
        scatter_x,
        scatter_y,
        versions,
    ] = counts[..]
    else {
        panic!("chart figures {counts:?}");
    };
    assert!(history_points >= 3, "windowed-MAE points: {counts:?}");
    assert_eq!(versions, 1, "one model version, one line: {counts:?}");
    assert_eq!(histogram_total, SAMPLES as u64, "histogram: {counts:?}");
    assert_eq!((scatter_x, scatter_y), (SAMPLES as u64, SAMPLES as u64));
    // A drawn canvas is not blank: some pixel of the scatter plot is not transparent.
    let painted = client
        .execute(
            "const cv = document.querySelector('#chart-scatter canvas'); \
             const px = cv.getContext('2d').getImageData(0, 0, cv.width, cv.height).data; \
             let n = 0; for (let i = 3; i < px.length; i += 4) if (px[i] > 0) n++; return n;",
            vec![],
        )
        .await
        .unwrap();
    assert!(
        painted.as_u64().unwrap_or(0) > 1000,
        "scatter canvas looks blank: {painted}"
    );
    let screenshot = client.screenshot().await.unwrap();
    assert!(
        screenshot.starts_with(b"\x89PNG"),
        "the screenshot is not a PNG"
    );
    // The README's picture is refreshed on request only, so a test run leaves the work tree clean.
    let shot = if std::env::var_os("UPDATE_DOCS_SCREENSHOT").is_some() {
        repo_root().join("docs/dashboard.png")
    } else {
        run.dir().join("dashboard.png")
    };
    std::fs::write(&shot, &screenshot).unwrap();

    // The broker goes away: the indicator says so.
    let stopping = Instant::now();
    node.stop();
    let stopped = Instant::now();
    let (shown, broker) = wait_text(&client, "broker", Duration::from_secs(10), |t| {
        t == "disconnected"
    })
    .await;
    assert!(
        shown,
        "indicator shows {broker:?} 10 s after the broker stopped"
    );
    eprintln!("dashboard: dead letters shown as {dead_letters:?}");
    eprintln!(
        "dashboard: {pairs} pairs, MAE {mae_text} (CSV {csv_mae}), charts {counts:?}; \
         disconnected shown {:.1} s after the node stopped ({:.1} s after the stop began)",
        stopped.elapsed().as_secs_f64(),
        stopping.elapsed().as_secs_f64()
    );
    client.close().await.unwrap();
}
