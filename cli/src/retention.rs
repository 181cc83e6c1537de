//! `tally cluster set-retention` and the retention flags of `tally cluster
//! init`: how long each granularity's buckets are kept.
//!
//! Each flag takes a duration (`14d`, `400days`) or `forever`. A flag not
//! given keeps the cluster's value (set-retention) or the server's default
//! (init: minutes 14 days, hours 400 days, the rest forever).

use std::time::Duration;

use clap::Args;
use serde_json::json;
use tally_proto::v1::{RetentionPolicy, SetRetentionRequest, StatusRequest};

use crate::{print_json, Cli};

/// One retention: `forever` or a duration.
#[derive(Debug, Clone, Copy)]
pub struct Keep(u64);

fn parse_keep(text: &str) -> Result<Keep, String> {
    if text.eq_ignore_ascii_case("forever") {
        return Ok(Keep(0));
    }
    let d = humantime::parse_duration(text).map_err(|e| format!("{e} (a duration such as 14d, or forever)"))?;
    let ms = u64::try_from(d.as_millis()).map_err(|_| "too long".to_string())?;
    if ms == 0 {
        return Err("0 keeps nothing; say forever to keep everything".into());
    }
    Ok(Keep(ms))
}

/// The per-granularity flags.
#[derive(Debug, Clone, Args)]
pub struct RetentionArgs {
    /// How long minute buckets are kept (default 14d).
    #[arg(long, value_parser = parse_keep)]
    pub keep_minutes: Option<Keep>,
    /// How long hour buckets are kept (default 400d).
    #[arg(long, value_parser = parse_keep)]
    pub keep_hours: Option<Keep>,
    /// How long day buckets are kept (default forever).
    #[arg(long, value_parser = parse_keep)]
    pub keep_days: Option<Keep>,
    /// How long month buckets are kept (default forever).
    #[arg(long, value_parser = parse_keep)]
    pub keep_months: Option<Keep>,
    /// How long year buckets are kept (default forever).
    #[arg(long, value_parser = parse_keep)]
    pub keep_years: Option<Keep>,
    /// Archive buckets that ended this long ago to the nodes' --archive-url
    /// (at least 1h; `off`, the default, archives nothing). Events older
    /// than that are refused from then on.
    #[arg(long, value_parser = parse_archive_after)]
    pub archive_after: Option<Keep>,
}

fn parse_archive_after(text: &str) -> Result<Keep, String> {
    if text.eq_ignore_ascii_case("off") {
        return Ok(Keep(0));
    }
    let d = humantime::parse_duration(text).map_err(|e| format!("{e} (a duration such as 30d, or off)"))?;
    u64::try_from(d.as_millis()).map(Keep).map_err(|_| "too long".to_string())
}

const DAY_MS: u64 = 86_400_000;

/// The server's default policy.
pub const DEFAULT: RetentionPolicy = RetentionPolicy {
    minute_ms: 14 * DAY_MS,
    hour_ms: 400 * DAY_MS,
    day_ms: 0,
    month_ms: 0,
    year_ms: 0,
    archive_after_ms: 0,
};

impl RetentionArgs {
    fn any(&self) -> bool {
        [self.keep_minutes, self.keep_hours, self.keep_days, self.keep_months, self.keep_years, self.archive_after]
            .iter()
            .any(Option::is_some)
    }

    /// `base` with the flags given applied.
    pub fn over(&self, base: RetentionPolicy) -> RetentionPolicy {
        let pick = |flag: Option<Keep>, current: u64| flag.map_or(current, |k| k.0);
        RetentionPolicy {
            minute_ms: pick(self.keep_minutes, base.minute_ms),
            hour_ms: pick(self.keep_hours, base.hour_ms),
            day_ms: pick(self.keep_days, base.day_ms),
            month_ms: pick(self.keep_months, base.month_ms),
            year_ms: pick(self.keep_years, base.year_ms),
            archive_after_ms: pick(self.archive_after, base.archive_after_ms),
        }
    }

    /// For init: the policy to send, or none for the server's default.
    pub fn for_init(&self) -> Option<RetentionPolicy> {
        self.any().then(|| self.over(DEFAULT))
    }
}

fn human(ms: u64) -> String {
    if ms == 0 {
        "forever".into()
    } else {
        humantime::format_duration(Duration::from_millis(ms)).to_string()
    }
}

pub fn print(cli: &Cli, policy: &RetentionPolicy) {
    if cli.json {
        print_json(&json!({
            "minute_ms": policy.minute_ms,
            "hour_ms": policy.hour_ms,
            "day_ms": policy.day_ms,
            "month_ms": policy.month_ms,
            "year_ms": policy.year_ms,
            "archive_after_ms": policy.archive_after_ms,
        }));
    } else {
        println!(
            "retention: minutes {}, hours {}, days {}, months {}, years {}; archive {}",
            human(policy.minute_ms),
            human(policy.hour_ms),
            human(policy.day_ms),
            human(policy.month_ms),
            human(policy.year_ms),
            match policy.archive_after_ms {
                0 => "off".to_string(),
                ms => format!("after {}", human(ms)),
            }
        );
    }
}

/// `tally cluster set-retention`.
pub async fn set(cli: &Cli, args: &RetentionArgs) -> anyhow::Result<i32> {
    let mut client = crate::cluster::raw_client(cli).await?;
    let current = client.status(StatusRequest {}).await?.into_inner().retention.unwrap_or(DEFAULT);
    let policy = args.over(current);
    let resp = client.set_retention(SetRetentionRequest { policy: Some(policy) }).await?.into_inner();
    print(cli, &resp.policy.unwrap_or(policy));
    Ok(0)
}
