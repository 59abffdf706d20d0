//! Headless Chromium driven over the W3C WebDriver protocol by Debian's
//! `chromedriver` (packages `chromium` and `chromium-driver`; .ci/run
//! installs them): a page is loaded once and then watched, the way a person
//! leaves a status page open.

use serde_json::{Value, json};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// One chromedriver and one browser session.
pub struct Browser {
    driver: Child,
    base: String,
    session: String,
    http: reqwest::Client,
    _profile: tempfile::TempDir,
}

impl Browser {
    /// Starts chromedriver on a free loopback port and opens a headless
    /// session with a window of `width` × `height` CSS pixels.
    pub async fn start(width: u32, height: u32) -> Browser {
        let http = reqwest::Client::builder()
            .no_proxy()
            .timeout(Duration::from_secs(60))
            .build()
            .expect("client");
        let profile = tempfile::tempdir().expect("profile dir");
        // The port is picked free and then handed over, so another test can
        // take it in between (chromedriver also binds the port on IPv6, and
        // exits when either is taken): a few attempts, each on a new port.
        let mut failures = Vec::new();
        let (driver, base) = 'attempts: {
            for _ in 0..5 {
                let port = std::net::TcpListener::bind("127.0.0.1:0")
                    .and_then(|l| l.local_addr())
                    .expect("a free port")
                    .port();
                let log = profile.path().join(format!("chromedriver-{port}.log"));
                let mut driver = Command::new("chromedriver")
                    .arg(format!("--port={port}"))
                    .arg("--allowed-ips=127.0.0.1")
                    .stdout(Stdio::null())
                    .stderr(std::fs::File::create(&log).expect("log file"))
                    .spawn()
                    .expect("chromedriver (Debian's chromium-driver package; .ci/run installs it)");
                let base = format!("http://127.0.0.1:{port}");
                let deadline = Instant::now() + Duration::from_secs(30);
                loop {
                    let ready = http
                        .get(format!("{base}/status"))
                        .send()
                        .await
                        .ok()
                        .is_some_and(|r| r.status().is_success());
                    if ready {
                        break 'attempts (driver, base);
                    }
                    if let Ok(Some(st)) = driver.try_wait() {
                        let why = std::fs::read_to_string(&log).unwrap_or_default();
                        failures.push(format!("port {port}: exited ({st}): {}", why.trim()));
                        break;
                    }
                    assert!(
                        Instant::now() < deadline,
                        "chromedriver was not ready in 30 s on port {port}"
                    );
                    tokio::time::sleep(Duration::from_millis(50)).await;
                }
            }
            panic!("chromedriver did not start: {failures:#?}");
        };
        let mut b = Browser {
            driver,
            base,
            session: String::new(),
            http,
            _profile: profile,
        };
        let caps = json!({"capabilities": {"alwaysMatch": {
            "browserName": "chrome",
            "goog:chromeOptions": {
                "binary": "/usr/bin/chromium",
                "args": [
                    "--headless=new", "--no-sandbox", "--disable-gpu", "--disable-quic",
                    "--no-first-run", "--disable-background-networking",
                    "--disable-component-update", "--disable-sync",
                    "--disable-dev-shm-usage", "--hide-scrollbars",
                    format!("--window-size={width},{height}"),
                    format!("--user-data-dir={}", b._profile.path().display()),
                ]
            }
        }}});
        let v = b.call("POST", "/session", Some(caps)).await;
        b.session = v["sessionId"]
            .as_str()
            .unwrap_or_else(|| panic!("no session: {v}"))
            .to_owned();
        b
    }

    async fn call(&self, method: &str, path: &str, body: Option<Value>) -> Value {
        let url = format!("{}{path}", self.base);
        let req = match method {
            "POST" => self
                .http
                .post(&url)
                .header("content-type", "application/json")
                .body(body.unwrap_or(json!({})).to_string()),
            "DELETE" => self.http.delete(&url),
            _ => self.http.get(&url),
        };
        let r = req
            .send()
            .await
            .unwrap_or_else(|e| panic!("webdriver {method} {path}: {e}"));
        let status = r.status();
        let text = r.bytes().await.expect("webdriver reply");
        let v: Value = serde_json::from_slice(&text).expect("webdriver JSON");
        assert!(
            status.is_success(),
            "webdriver {method} {path}: {status} {v}"
        );
        v["value"].clone()
    }

    fn at(&self, rest: &str) -> String {
        format!("/session/{}{rest}", self.session)
    }

    /// Loads `url` and waits for the document to finish loading.
    pub async fn open(&self, url: &str) {
        self.call("POST", &self.at("/url"), Some(json!({ "url": url })))
            .await;
    }

    /// Runs `script` (a function body; `return` gives the value) in the page.
    pub async fn eval(&self, script: &str) -> Value {
        self.call(
            "POST",
            &self.at("/execute/sync"),
            Some(json!({ "script": script, "args": [] })),
        )
        .await
    }

    /// Evaluates `script` until `ok` holds for its value, or panics with
    /// the last value after `deadline`.
    pub async fn wait_for(
        &self,
        what: &str,
        deadline: Duration,
        script: &str,
        ok: impl Fn(&Value) -> bool,
    ) -> Value {
        let end = Instant::now() + deadline;
        loop {
            let v = self.eval(script).await;
            if ok(&v) {
                return v;
            }
            assert!(
                Instant::now() < end,
                "{what}: not within {deadline:?}; last: {v}"
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    /// A PNG of the viewport.
    pub async fn screenshot(&self) -> Vec<u8> {
        use base64::Engine;
        let v = self.call("GET", &self.at("/screenshot"), None).await;
        base64::engine::general_purpose::STANDARD
            .decode(v.as_str().expect("base64"))
            .expect("PNG")
    }

    /// Sets the window's outer size.
    pub async fn resize(&self, width: u32, height: u32) {
        self.call(
            "POST",
            &self.at("/window/rect"),
            Some(json!({ "width": width, "height": height })),
        )
        .await;
    }
}

impl Drop for Browser {
    fn drop(&mut self) {
        // The session's Chromium goes with its driver's process group on
        // kill; ask politely first.
        let _ = Command::new("curl")
            .args(["-s", "-m", "5", "-X", "DELETE"])
            .arg(format!("{}/session/{}", self.base, self.session))
            .stdout(Stdio::null())
            .status();
        let _ = self.driver.kill();
        let _ = self.driver.wait();
    }
}
