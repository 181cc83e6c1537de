//! The deploy files (`deploy/k8s/`, `Dockerfile`) cannot drift from the
//! binaries: the StatefulSet's command is rendered the way a pod runs it
//! (`/bin/sh -c`, with a pod's HOSTNAME and namespace) with `--print-config`
//! appended, and the configuration tallyd prints must match the ports,
//! names and volume the manifests declare; a node started from that
//! configuration answers the probes' paths; every flag of the Jobs' `tally`
//! commands exists in that command's `--help`; the Dockerfile exposes the
//! same ports and builds binaries of these names.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};
use std::process::Command;

use anyhow::{bail, ensure, Context};
use yaml_rust2::{Yaml, YamlLoader};

fn repo_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("..")
}

fn load_yaml(file: &str) -> anyhow::Result<Vec<Yaml>> {
    let path = repo_root().join("deploy/k8s").join(file);
    let text = std::fs::read_to_string(&path).with_context(|| format!("reading {}", path.display()))?;
    YamlLoader::load_from_str(&text).with_context(|| format!("parsing {}", path.display()))
}

fn one_of_kind(docs: &[Yaml], kind: &str, name: &str) -> anyhow::Result<Yaml> {
    docs.iter()
        .find(|d| d["kind"].as_str() == Some(kind) && d["metadata"]["name"].as_str() == Some(name))
        .cloned()
        .with_context(|| format!("no {kind} named {name}"))
}

fn str_of<'a>(y: &'a Yaml, what: &str) -> anyhow::Result<&'a str> {
    y.as_str().with_context(|| format!("{what} is not a string: {y:?}"))
}

/// name → number of a container's or a Service's ports.
fn named_ports(ports: &Yaml, number_key: &str) -> anyhow::Result<BTreeMap<String, i64>> {
    let mut out = BTreeMap::new();
    for p in ports.as_vec().context("ports is not a list")? {
        let name = str_of(&p["name"], "port name")?.to_string();
        let number = p[number_key].as_i64().with_context(|| format!("port {name} has no {number_key}"))?;
        out.insert(name, number);
    }
    Ok(out)
}

fn port_of(addr: &str) -> anyhow::Result<i64> {
    let (_, port) = addr.rsplit_once(':').with_context(|| format!("{addr:?} has no port"))?;
    port.parse().with_context(|| format!("{addr:?}: bad port"))
}

/// The one shell script of a container (`command: [/bin/sh, -c]`, `args: [script]`).
fn container_script(container: &Yaml) -> anyhow::Result<String> {
    let command: Vec<&str> =
        container["command"].as_vec().context("no command")?.iter().filter_map(Yaml::as_str).collect();
    ensure!(command == ["/bin/sh", "-c"], "command is {command:?}, expected a /bin/sh -c script");
    let args = container["args"].as_vec().context("no args")?;
    ensure!(args.len() == 1, "expected one script in args");
    Ok(str_of(&args[0], "args[0]")?.to_string())
}

fn long_flags(words: &[&str]) -> Vec<String> {
    words.iter().filter(|w| w.starts_with("--")).map(|w| w.split('=').next().unwrap_or(w).to_string()).collect()
}

fn help_of(binary: &Path, subcommand: &[&str]) -> anyhow::Result<String> {
    let out = Command::new(binary).args(subcommand).arg("--help").output()?;
    ensure!(out.status.success(), "{} {subcommand:?} --help failed", binary.display());
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// The printed configuration of the StatefulSet's command for pod `pod` in
/// namespace `namespace`.
fn render_node_config(script: &str, pod: &str, namespace: &str) -> anyhow::Result<toml::Table> {
    let tallyd = cluster_tests::tallyd_binary()?;
    let bin_dir = tallyd.parent().context("tallyd's directory")?;
    let out = Command::new("/bin/sh")
        .arg("-c")
        .arg(format!("{script} --print-config"))
        .env_clear()
        .env("PATH", format!("{}:/usr/bin:/bin", bin_dir.display()))
        .env("HOSTNAME", pod)
        .env("POD_NAMESPACE", namespace)
        .output()?;
    ensure!(
        out.status.success(),
        "the StatefulSet's command failed for {pod}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    Ok(toml::from_str(&String::from_utf8_lossy(&out.stdout))?)
}

#[tokio::test]
async fn kubernetes_manifests_match_the_binaries() -> anyhow::Result<()> {
    let _turn = cluster_tests::serial::shared().await;
    let tallyd = cluster_tests::tallyd_binary()?;
    let tally = cluster_tests::cli::tally_binary()?;

    // Everything the kustomization lists exists and parses.
    let kustomization = load_yaml("kustomization.yaml")?;
    let resources: Vec<&str> =
        kustomization[0]["resources"].as_vec().context("resources")?.iter().filter_map(Yaml::as_str).collect();
    for file in ["namespace.yaml", "services.yaml", "statefulset.yaml", "init-job.yaml"] {
        ensure!(resources.contains(&file), "kustomization.yaml does not list {file}");
    }
    let mut docs = Vec::new();
    for file in &resources {
        docs.extend(load_yaml(file)?);
    }

    let set = one_of_kind(&docs, "StatefulSet", "tally")?;
    let service_name = str_of(&set["spec"]["serviceName"], "serviceName")?;
    let replicas = set["spec"]["replicas"].as_i64().context("replicas")?;
    ensure!(
        set["spec"]["podManagementPolicy"].as_str() == Some("Parallel"),
        "pods must start together: init needs every node, and a node is ready only after init"
    );
    let container = &set["spec"]["template"]["spec"]["containers"][0];
    let ports = named_ports(&container["ports"], "containerPort")?;
    let names: BTreeSet<&str> = ports.keys().map(String::as_str).collect();
    ensure!(names == BTreeSet::from(["client", "peer", "http"]), "container ports {names:?}");
    let mount = container["volumeMounts"]
        .as_vec()
        .context("volumeMounts")?
        .iter()
        .find(|m| m["name"].as_str() == Some("data"))
        .context("no data volume mount")?;
    let data_dir = str_of(&mount["mountPath"], "mountPath")?;

    // The command as pod 2 of namespace "ns" runs it.
    let script = container_script(container)?;
    let config = render_node_config(&script, &format!("{service_name}-2"), "ns")?;
    let get = |key: &str| config.get(key).and_then(toml::Value::as_str).unwrap_or_default().to_string();
    ensure!(config.get("node_id").and_then(toml::Value::as_integer) == Some(3), "pod -2 must be node 3: {config:?}");
    ensure!(port_of(&get("listen"))? == ports["client"], "--listen vs the client port");
    ensure!(port_of(&get("peer_listen"))? == ports["peer"], "--peer-listen vs the peer port");
    ensure!(port_of(&get("http_listen"))? == ports["http"], "--http-listen vs the http port");
    let pod_dns = format!("{service_name}-2.{service_name}.ns.svc.cluster.local");
    ensure!(get("advertise") == format!("{pod_dns}:{}", ports["client"]), "advertise {:?}", get("advertise"));
    ensure!(
        get("peer_advertise") == format!("{pod_dns}:{}", ports["peer"]),
        "peer_advertise {:?}",
        get("peer_advertise")
    );
    ensure!(get("data_dir") == data_dir, "data_dir {:?} vs the volume at {data_dir}", get("data_dir"));
    ensure!(get("log_format") == "json", "log shippers expect --log-format json");

    // The headless Service names the pods and publishes them before they
    // are ready; both Services point at ports the container has.
    let headless = one_of_kind(&docs, "Service", service_name)?;
    ensure!(headless["spec"]["clusterIP"].as_str() == Some("None"), "{service_name} must be headless");
    ensure!(headless["spec"]["publishNotReadyAddresses"].as_bool() == Some(true), "peers must resolve before ready");
    for service in [&headless, &one_of_kind(&docs, "Service", "tally-client")?] {
        for p in service["spec"]["ports"].as_vec().context("service ports")? {
            let target = str_of(&p["targetPort"], "targetPort")?;
            let number = p["port"].as_i64().context("service port")?;
            ensure!(ports.get(target) == Some(&number), "service port {target}={number} vs container {ports:?}");
        }
    }

    // A node started from the rendered configuration (on free loopback
    // ports) answers the probes: liveness 200, readiness a real route (503
    // until the cluster is initialised).
    let free = cluster_tests::free_ports(3)?;
    let dir = tempfile::tempdir()?;
    let config_file = dir.path().join("node.toml");
    std::fs::write(&config_file, toml::to_string(&config)?)?;
    let http = format!("127.0.0.1:{}", free[2]);
    let mut node = Command::new(&tallyd)
        .arg("--config")
        .arg(&config_file)
        .args(["--listen", &format!("127.0.0.1:{}", free[0])])
        .args(["--peer-listen", &format!("127.0.0.1:{}", free[1])])
        .args(["--http-listen", &http])
        .arg("--data-dir")
        .arg(dir.path().join("data"))
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()?;
    let probes = async {
        for (probe, expected) in [("livenessProbe", [200, 200]), ("readinessProbe", [200, 503])] {
            let get = &container[probe]["httpGet"];
            ensure!(get["port"].as_str() == Some("http"), "{probe} must use the http port");
            let path = str_of(&get["path"], "probe path")?;
            let deadline = tokio::time::Instant::now() + std::time::Duration::from_secs(30);
            let status = loop {
                match cluster_tests::http_get(&http, path).await {
                    Ok((status, _)) => break status,
                    Err(e) if tokio::time::Instant::now() > deadline => bail!("{probe} {path}: {e}"),
                    Err(_) => tokio::time::sleep(std::time::Duration::from_millis(100)).await,
                }
            };
            ensure!(expected.contains(&status), "{probe} {path} answered {status}");
        }
        Ok(())
    }
    .await;
    let _ = node.kill();
    let _ = node.wait();
    probes?;

    // The Jobs' tally commands: every flag exists; the nodes named are the
    // StatefulSet's pods on the client port, one per replica.
    let mut jobs = vec![one_of_kind(&docs, "Job", "tally-init")?];
    jobs.extend(load_yaml("add-node-job.yaml")?.into_iter().filter(|d| d["kind"].as_str() == Some("Job")));
    ensure!(jobs.len() == 2, "expected the init and add-node Jobs");
    let global = help_of(&tally, &[])?;
    for job in &jobs {
        let script = container_script(&job["spec"]["template"]["spec"]["containers"][0])?;
        for command in script.split(';').map(str::trim).filter(|c| c.starts_with("tally ")) {
            let words: Vec<&str> = command.split_whitespace().collect();
            let sub: Vec<&str> =
                words[1..].iter().filter(|w| !w.starts_with('-') && !w.contains('"')).take(2).copied().collect();
            let help = help_of(&tally, &sub)?;
            for flag in long_flags(&words) {
                ensure!(
                    help.contains(&format!("{flag} ")) || global.contains(&format!("{flag} ")),
                    "`tally {}` has no {flag}",
                    sub.join(" ")
                );
            }
            if sub == ["cluster", "init"] {
                let nodes: Vec<&str> =
                    words.windows(2).filter(|w| w[0] == "--node").map(|w| w[1].trim_matches('"')).collect();
                ensure!(
                    nodes.len() as i64 == replicas,
                    "init names {} nodes, the StatefulSet has {replicas}",
                    nodes.len()
                );
                for (i, node) in nodes.iter().enumerate() {
                    let expected = format!("{}={service_name}-{i}.$S:{}", i + 1, ports["client"]);
                    ensure!(*node == expected, "init --node {node:?}, expected {expected:?}");
                }
            }
        }
    }

    // The Dockerfile exposes the same ports and builds binaries of these names.
    let dockerfile = std::fs::read_to_string(repo_root().join("Dockerfile"))?;
    let exposed: BTreeSet<i64> = dockerfile
        .lines()
        .filter_map(|l| l.strip_prefix("EXPOSE "))
        .flat_map(|l| l.split_whitespace().filter_map(|p| p.parse().ok()))
        .collect();
    ensure!(exposed == ports.values().copied().collect(), "Dockerfile exposes {exposed:?}, manifests {ports:?}");
    for binary in [&tallyd, &tally] {
        let name = binary.file_name().and_then(|n| n.to_str()).context("binary name")?;
        ensure!(dockerfile.contains(&format!("--bin {name}")), "the Dockerfile does not build {name}");
    }
    Ok(())
}
