//! The live dashboard on the HTTP listener: `GET /` is a page (embedded in
//! the binary: `dashboard/`, no CDN, nothing fetched from elsewhere) that
//! polls the JSON routes below and draws the cluster, the rates and a
//! Stats/Series query with a chart of the series.
//!
//! - `GET /api/cluster`: the cluster as every node reports it. The node
//!   serving the page asks each node of the map for `Cluster.Status` (its
//!   own in-process, the others on their public port, 1 s each) and merges:
//!   a partition's leader is the one reported in the highest term. A node
//!   that does not answer in time is shown down. Node counters (events by
//!   outcome, queries) let the page compute rates between two polls.
//! - `GET /api/stats` and `GET /api/series`: the Query service's answers,
//!   called in-process, so routing, forwarding and consistency are exactly
//!   those of a gRPC client's query. Parameters: `entity`, `type`, `from`
//!   and `to` (ms since the epoch), `granularity` (minute, hour, day,
//!   month), `consistency` (linearizable, stale).
//!
//! Only reads: nothing on this listener changes the cluster. With tokens on
//! (`--auth-file`), the JSON routes ask for the same bearer token the
//! public port would for the same data (any token for the cluster view, a
//! reader's for counts); the page keeps one the user types in for the
//! browser session.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use axum::extract::{Query as QueryParams, State};
use axum::http::{header, StatusCode};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::{Json, Router};
use serde::Deserialize;
use serde_json::{json, Value};
use tally_proto::v1::cluster_client::ClusterClient;
use tally_proto::v1::query_server::Query;
use tally_proto::v1::{Consistency, Granularity, SeriesRequest, StatsRequest, StatusRequest, StatusResponse};
use tonic::Request;

use crate::api::auth::Tokens;
use crate::api::cluster::local_status;
use crate::api::query::QueryService;
use crate::node::Node;

/// How long the page's server waits for each node's status.
const STATUS_TIMEOUT: Duration = Duration::from_secs(1);

const INDEX_HTML: &str = include_str!("dashboard/index.html");
const DASHBOARD_JS: &str = include_str!("dashboard/dashboard.js");
const DASHBOARD_CSS: &str = include_str!("dashboard/dashboard.css");

/// The dashboard's routes, merged into the HTTP listener's router.
pub fn routes(node: Arc<Node>, tokens: Tokens) -> Router {
    let asset = |content_type: &'static str, body: &'static str| {
        get(move || async move { ([(header::CONTENT_TYPE, content_type), (header::CACHE_CONTROL, "no-cache")], body) })
    };
    Router::new()
        .route("/", asset("text/html; charset=utf-8", INDEX_HTML))
        .route("/dashboard.js", asset("text/javascript; charset=utf-8", DASHBOARD_JS))
        .route("/dashboard.css", asset("text/css; charset=utf-8", DASHBOARD_CSS))
        .merge(
            Router::new()
                .route("/api/cluster", get(cluster))
                .route("/api/stats", get(stats))
                .route("/api/series", get(series))
                .route_layer(middleware::from_fn_with_state(tokens, require_token))
                .with_state(node),
        )
}

/// The public port's rule for the same data: Status for the cluster view,
/// Query for counts.
async fn require_token(State(tokens): State<Tokens>, request: axum::extract::Request, next: Next) -> Response {
    let as_grpc = match request.uri().path() {
        "/api/cluster" => "/tally.v1.Cluster/Status",
        _ => "/tally.v1.Query/Stats",
    };
    let header = request.headers().get(header::AUTHORIZATION).map(|v| v.as_bytes());
    match tokens.check(as_grpc, header) {
        Ok(()) => next.run(request).await,
        Err(refusal) => {
            let code = match refusal.code() {
                tonic::Code::PermissionDenied => StatusCode::FORBIDDEN,
                _ => StatusCode::UNAUTHORIZED,
            };
            (code, Json(json!({ "error": refusal.message(), "token_required": true }))).into_response()
        }
    }
}

async fn cluster(State(node): State<Arc<Node>>) -> Json<Value> {
    let own = local_status(&node);
    let asks = own.nodes.iter().filter(|n| n.node_id != node.id).map(|n| {
        let (id, addr) = (n.node_id, n.addr.clone());
        let node = node.clone();
        async move {
            let answer = async {
                let channel = node.peers.public_channel(id, &addr).map_err(|e| e.to_string())?;
                let mut request = Request::new(StatusRequest {});
                request.set_timeout(STATUS_TIMEOUT);
                let reply = tokio::time::timeout(STATUS_TIMEOUT, ClusterClient::new(channel).status(request))
                    .await
                    .map_err(|_| "no answer within 1 s".to_string())?;
                reply.map(|r| r.into_inner()).map_err(|s| s.message().to_string())
            };
            (id, answer.await)
        }
    });
    let mut answers: BTreeMap<u64, Result<StatusResponse, String>> =
        futures::future::join_all(asks).await.into_iter().collect();
    answers.insert(node.id, Ok(own.clone()));
    Json(merge(node.id, &own, &answers))
}

/// One JSON view of the cluster from every node's answer.
fn merge(serving: u64, own: &StatusResponse, answers: &BTreeMap<u64, Result<StatusResponse, String>>) -> Value {
    let reports = || answers.values().filter_map(|a| a.as_ref().ok());
    let partitions: Vec<Value> = own
        .partitions
        .iter()
        .map(|p| {
            // The leader reported in the highest term wins; a stale view of
            // a deposed leader has a lower one.
            let seen = reports().filter_map(|r| r.partitions.iter().find(|q| q.partition == p.partition));
            let best = seen.clone().filter(|q| q.leader_node_id != 0).max_by_key(|q| q.term);
            let quiesced_on: Vec<u64> = reports()
                .filter(|r| r.partitions.iter().any(|q| q.partition == p.partition && q.quiesced))
                .map(|r| r.node_id)
                .collect();
            json!({
                "partition": p.partition,
                "replicas": p.replicas,
                "leader": best.map(|q| q.leader_node_id).unwrap_or(0),
                "term": best.map(|q| q.term).unwrap_or(0),
                "commit_index": seen.map(|q| q.commit_index).max().unwrap_or(0),
                "quiesced_on": quiesced_on,
            })
        })
        .collect();
    let leads = |id: u64| partitions.iter().filter(|p| p["leader"] == id).count();
    let nodes: Vec<Value> = own
        .nodes
        .iter()
        .map(|n| {
            let answer = answers.get(&n.node_id);
            let report = answer.and_then(|a| a.as_ref().ok());
            json!({
                "node_id": n.node_id,
                "addr": n.addr,
                "up": report.is_some(),
                "error": answer.and_then(|a| a.as_ref().err()),
                "leads": leads(n.node_id),
                "replicas": own.partitions.iter().filter(|p| p.replicas.contains(&n.node_id)).count(),
                "quiesced": report.map(|r| r.partitions.iter().filter(|p| p.quiesced).count()),
                "events_accepted": report.map(|r| r.events_accepted),
                "events_duplicate": report.map(|r| r.events_duplicate),
                "events_rejected": report.map(|r| r.events_rejected),
                "queries": report.map(|r| r.queries),
                "dedup_keys": report.map(|r| r.dedup_keys),
                "dedup_conflicts": report.map(|r| r.dedup_conflicts),
            })
        })
        .collect();
    let metadata_leader =
        reports().filter(|r| r.metadata_leader_node_id != 0).map(|r| r.metadata_leader_node_id).next().unwrap_or(0);
    json!({
        "serving_node": serving,
        "initialized": own.initialized,
        "partition_count": own.partition_count,
        "replication_factor": own.replication_factor,
        "metadata_leader": metadata_leader,
        "nodes": nodes,
        "partitions": partitions,
        "now_ms": std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.as_millis() as i64).unwrap_or(0),
    })
}

#[derive(Debug, Deserialize)]
struct QueryArgs {
    entity: String,
    #[serde(rename = "type")]
    event_type: String,
    from: i64,
    to: i64,
    granularity: Option<String>,
    consistency: Option<String>,
}

fn bad_request(message: impl Into<String>) -> Response {
    (StatusCode::BAD_REQUEST, Json(json!({ "error": message.into() }))).into_response()
}

type QueryResult = Result<QueryParams<QueryArgs>, axum::extract::rejection::QueryRejection>;

/// The query's parameters and consistency, or the 400 that names what was wrong.
fn query_args(args: QueryResult) -> Result<(QueryArgs, Consistency), Response> {
    let QueryParams(args) = args.map_err(|e| bad_request(e.body_text()))?;
    let consistency = match args.consistency.as_deref().unwrap_or("linearizable") {
        "linearizable" => Consistency::Linearizable,
        "stale" => Consistency::Stale,
        other => return Err(bad_request(format!("consistency: {other:?} is not linearizable or stale"))),
    };
    Ok((args, consistency))
}

/// A refused query as the page shows it: the gRPC code and its message.
fn query_error(status: tonic::Status) -> Response {
    let code = match status.code() {
        tonic::Code::InvalidArgument | tonic::Code::OutOfRange => StatusCode::BAD_REQUEST,
        tonic::Code::FailedPrecondition | tonic::Code::Unavailable => StatusCode::SERVICE_UNAVAILABLE,
        _ => StatusCode::INTERNAL_SERVER_ERROR,
    };
    (code, Json(json!({ "error": format!("{:?}: {}", status.code(), status.message()) }))).into_response()
}

async fn stats(State(node): State<Arc<Node>>, args: QueryResult) -> Response {
    let (args, consistency) = match query_args(args) {
        Ok(parsed) => parsed,
        Err(refusal) => return refusal,
    };
    let request = StatsRequest {
        entity_id: args.entity.into_bytes(),
        event_type: args.event_type,
        from_ms: args.from,
        to_ms: args.to,
        consistency: consistency as i32,
        share_partition_plus_one: 0,
    };
    match QueryService::new(node).stats(Request::new(request)).await {
        Ok(reply) => {
            let r = reply.into_inner();
            Json(json!({
                "count": r.count, "sum": r.sum_exact, "average": r.average,
                "from": r.effective_from_ms, "to": r.effective_to_ms, "served_by": r.served_by_node_id,
            }))
            .into_response()
        }
        Err(status) => query_error(status),
    }
}

async fn series(State(node): State<Arc<Node>>, args: QueryResult) -> Response {
    let (args, consistency) = match query_args(args) {
        Ok(parsed) => parsed,
        Err(refusal) => return refusal,
    };
    let granularity = match args.granularity.as_deref().unwrap_or("minute") {
        "minute" => Granularity::Minute,
        "hour" => Granularity::Hour,
        "day" => Granularity::Day,
        "month" => Granularity::Month,
        "year" => Granularity::Year,
        other => return bad_request(format!("granularity: {other:?} is not minute, hour, day, month or year")),
    };
    let request = SeriesRequest {
        entity_id: args.entity.into_bytes(),
        event_type: args.event_type,
        from_ms: args.from,
        to_ms: args.to,
        granularity: granularity as i32,
        consistency: consistency as i32,
        share_partition_plus_one: 0,
    };
    match QueryService::new(node).series(Request::new(request)).await {
        Ok(reply) => {
            let r = reply.into_inner();
            let buckets: Vec<Value> =
                r.buckets.iter().map(|b| json!({"start": b.start_ms, "count": b.count, "sum": b.sum_exact})).collect();
            Json(json!({ "buckets": buckets, "served_by": r.served_by_node_id })).into_response()
        }
        Err(status) => query_error(status),
    }
}
