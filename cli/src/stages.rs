//! `tally cluster stages [--reset]`: where each node's time goes — the
//! latency of every stage of its write and read paths (`Cluster.Stages`),
//! one table per node. `--reset` starts a new window on every node after
//! reading it (how `scripts/bench.sh` measures one run alone).

use tally_bench::report::{Stage, StagesDoc, StagesNode};
use tally_proto::v1::cluster_client::ClusterClient;
use tally_proto::v1::{StagesRequest, StagesResponse};

use crate::table::Table;
use crate::Cli;

pub(crate) async fn run(cli: &Cli, reset: bool) -> anyhow::Result<i32> {
    let view = crate::cluster::status_view(cli).await?;
    let mut answers: Vec<(String, Result<StagesResponse, String>)> = Vec::new();
    for (addr, _) in &view.answers {
        let answer = match cli.connect_node(addr).await {
            Ok(channel) => ClusterClient::new(channel)
                .stages(StagesRequest { reset })
                .await
                .map(|r| r.into_inner())
                .map_err(|s| s.message().to_owned()),
            Err(e) => Err(e.to_string()),
        };
        answers.push((addr.clone(), answer));
    }
    if cli.json {
        println!("{}", serde_json::to_string(&to_doc(&answers))?);
    } else {
        print!("{}", render(&answers));
    }
    Ok(if answers.iter().any(|(_, a)| a.is_ok()) { 0 } else { 1 })
}

/// The `--json` document, the type `tally bench report` reads back.
fn to_doc(answers: &[(String, Result<StagesResponse, String>)]) -> StagesDoc {
    let nodes = answers
        .iter()
        .map(|(addr, answer)| match answer {
            Ok(r) => StagesNode {
                addr: addr.clone(),
                node_id: Some(r.node_id),
                window_s: Some(r.window_s),
                stages: Some(
                    r.stages
                        .iter()
                        .map(|s| Stage {
                            name: s.name.clone(),
                            description: s.description.clone(),
                            count: s.count,
                            mean_ms: s.mean_ms,
                            p50_ms: s.p50_ms,
                            p90_ms: s.p90_ms,
                            p99_ms: s.p99_ms,
                            p999_ms: s.p999_ms,
                            max_ms: s.max_ms,
                        })
                        .collect(),
                ),
                error: None,
            },
            Err(e) => {
                StagesNode { addr: addr.clone(), node_id: None, window_s: None, stages: None, error: Some(e.clone()) }
            }
        })
        .collect();
    StagesDoc { nodes }
}

fn render(answers: &[(String, Result<StagesResponse, String>)]) -> String {
    let ms = |v: f64| format!("{v:.2}");
    let mut out = String::new();
    for (addr, answer) in answers {
        match answer {
            Ok(r) => {
                out.push_str(&format!("node {} ({addr}), last {:.1} s:\n", r.node_id, r.window_s));
                let mut table = Table::new(["stage", "count", "mean ms", "p50", "p90", "p99", "p99.9", "max"]);
                for s in &r.stages {
                    table.row([
                        s.name.clone(),
                        s.count.to_string(),
                        ms(s.mean_ms),
                        ms(s.p50_ms),
                        ms(s.p90_ms),
                        ms(s.p99_ms),
                        ms(s.p999_ms),
                        ms(s.max_ms),
                    ]);
                }
                out.push_str(&table.render());
                out.push('\n');
            }
            Err(e) => out.push_str(&format!("node at {addr}: {e}\n\n")),
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use tally_proto::v1::StageLatency;

    use super::*;

    #[test]
    fn renders_a_table_per_node_and_errors_inline() {
        let ok = StagesResponse {
            node_id: 2,
            window_s: 10.0,
            stages: vec![StageLatency { name: "log.fsync".into(), count: 7, p99_ms: 1.5, ..Default::default() }],
        };
        let text = render(&[("a:1".into(), Ok(ok)), ("b:1".into(), Err("unreachable".into()))]);
        assert!(text.contains("node 2 (a:1), last 10.0 s:"), "{text}");
        assert!(text.lines().any(|l| l.starts_with("log.fsync") && l.contains("1.50")), "{text}");
        assert!(text.contains("node at b:1: unreachable"), "{text}");
    }
}
