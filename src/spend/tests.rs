use chrono::TimeZone;

use super::*;

fn utc(s: &str) -> DateTime<Utc> {
    crate::time::from_text(s).unwrap()
}

fn params(pairs: &[(&str, &str)]) -> SpendParams {
    SpendParams::from_lookup(|n| pairs.iter().find(|(k, _)| *k == n).map(|(_, v)| *v))
}

fn err(p: &[(&str, &str)]) -> String {
    match plan(&params(p), utc("2026-03-15T12:00:00Z"), chrono_tz::UTC) {
        Err(SpendError::Invalid(m)) => m,
        other => panic!("{p:?} was accepted: {other:?}"),
    }
}

#[test]
fn times_take_three_forms() {
    let now = utc("2026-03-15T12:00:00Z");
    let paris: Tz = "Europe/Paris".parse().unwrap();
    assert_eq!(
        parse_time("since", "2026-03-01T10:00:00+02:00", now, paris).unwrap(),
        utc("2026-03-01T08:00:00Z")
    );
    // A date is local midnight in the report's zone.
    assert_eq!(
        parse_time("since", "2026-03-01", now, paris).unwrap(),
        utc("2026-02-28T23:00:00Z")
    );
    assert_eq!(
        parse_time("since", "7d", now, paris).unwrap(),
        utc("2026-03-08T12:00:00Z")
    );
    assert_eq!(
        parse_time("since", "36h", now, paris).unwrap(),
        utc("2026-03-14T00:00:00Z")
    );
    assert_eq!(
        parse_time("since", "2w", now, paris).unwrap(),
        utc("2026-03-01T12:00:00Z")
    );
    for bad in [
        "",
        "d",
        "7",
        "7x",
        "-7d",
        "1234567d",
        "yesterday",
        "2026-13-01",
        "0001-01-01T00:00:00Z",
    ] {
        assert!(parse_time("since", bad, now, paris).is_err(), "{bad:?}");
    }
}

#[test]
fn every_parameter_is_validated() {
    assert!(err(&[("group_by", "day,hour")]).contains("at most one of hour"));
    assert!(err(&[("group_by", "model,key,user")]).contains("at most two"));
    assert!(err(&[("group_by", "model,model")]).contains("twice"));
    assert!(err(&[("group_by", "colour")]).contains("unknown `group_by`"));
    assert!(err(&[("since", "2026-03-10"), ("until", "2026-03-01")]).contains("before"));
    assert!(err(&[("since", "2024-01-01")]).contains("366 days"));
    assert!(err(&[("since", "60d"), ("group_by", "hour")]).contains("1000 hour buckets"));
    assert!(err(&[("limit", "0")]).contains("`limit`"));
    assert!(err(&[("limit", "10001")]).contains("`limit`"));
    assert!(err(&[("model", "a\u{0}b")]).contains("control"));
    assert!(err(&[("key", &"k".repeat(300))]).contains("256"));
    // Defaults: the 7 days before now, no grouping, 1000 rows.
    let p = plan(
        &SpendParams::default(),
        utc("2026-03-15T12:00:00Z"),
        chrono_tz::UTC,
    )
    .unwrap();
    assert_eq!(
        (p.since, p.until),
        (utc("2026-03-08T12:00:00Z"), utc("2026-03-15T12:00:00Z"))
    );
    assert!(p.group_by.is_empty() && p.bounds.is_empty());
    assert_eq!(p.limit, DEFAULT_ROWS);
}

#[test]
fn buckets_tile_the_period_in_local_time() {
    let ny: Tz = "America/New_York".parse().unwrap();
    let now = utc("2026-03-15T12:00:00Z");
    // The week of the DST change (2026-03-08) starts on Monday 2026-03-02 local midnight.
    let p = plan(
        &params(&[
            ("since", "2026-03-04"),
            ("until", "2026-03-17"),
            ("group_by", "week,model"),
        ]),
        now,
        ny,
    )
    .unwrap();
    assert_eq!(p.time_dim(), Some(Dim::Week));
    assert_eq!(p.other_dims(), vec![Dim::Model]);
    let local: Vec<String> = p.bounds.iter().map(|t| local_text(*t, ny)).collect();
    assert_eq!(
        local,
        [
            "2026-03-02T00:00:00-05:00",
            "2026-03-09T00:00:00-04:00",
            "2026-03-16T00:00:00-04:00",
            "2026-03-23T00:00:00-04:00"
        ]
    );
    // Days around the change last 24, 23, 24 hours.
    let p = plan(
        &params(&[
            ("since", "2026-03-07"),
            ("until", "2026-03-10"),
            ("group_by", "day"),
        ]),
        now,
        ny,
    )
    .unwrap();
    let hours: Vec<i64> = p
        .bounds
        .windows(2)
        .map(|w| (w[1] - w[0]).num_hours())
        .collect();
    assert_eq!(hours, [24, 23, 24]);
    // An unaligned period: the first bucket starts before `since`, the last ends after `until`.
    let p = plan(
        &params(&[
            ("since", "2026-03-01T10:30:00Z"),
            ("until", "2026-03-01T12:10:00Z"),
            ("group_by", "hour"),
        ]),
        now,
        chrono_tz::UTC,
    )
    .unwrap();
    assert_eq!(
        p.bounds,
        [
            utc("2026-03-01T10:00:00Z"),
            utc("2026-03-01T11:00:00Z"),
            utc("2026-03-01T12:00:00Z"),
            utc("2026-03-01T13:00:00Z")
        ]
    );
}

#[test]
fn the_sql_binds_every_user_value() {
    let p = plan(
        &params(&[
            ("since", "2026-03-01"),
            ("until", "2026-03-05"),
            ("group_by", "day,user"),
            ("model", "x' OR 1=1 --"),
        ]),
        utc("2026-03-15T12:00:00Z"),
        chrono_tz::UTC,
    )
    .unwrap();
    for d in [sql::Dialect::Sqlite, sql::Dialect::Postgres] {
        let (q, params) = sql::groups(d, &p);
        assert!(!q.contains("OR 1=1"), "{q}");
        assert_eq!(params.len(), 3);
        assert_eq!(params[2], "x' OR 1=1 --");
        assert!(q.contains("GROUP BY bucket, user_id"), "{q}");
        assert!(q.ends_with(&format!("LIMIT {}", DEFAULT_ROWS + 1)), "{q}");
        // 4 day buckets: a binary search of depth 2.
        assert_eq!(q.matches("CASE WHEN started_at <").count(), 3, "{q}");
        let (t, params) = sql::totals(d, &p);
        // Whole UTC days: every hour from the rollups, none from the ledger's rows.
        assert!(t.contains("FROM spend_hourly "), "{t}");
        assert!(!t.contains("FROM billing_transactions"), "{t}");
        assert_eq!(params.len(), 3);
    }
}

fn sample() -> Value {
    let tz: Tz = "Europe/Paris".parse().unwrap();
    let p = plan(
        &params(&[
            ("since", "2026-03-01"),
            ("until", "2026-03-03"),
            ("group_by", "day,model"),
        ]),
        utc("2026-03-15T12:00:00Z"),
        tz,
    )
    .unwrap();
    let sums = |r, c| Sums {
        requests: r,
        input_tokens: 1000 * r,
        output_tokens: 10 * r,
        cost_micros: c,
        ..Sums::default()
    };
    let data = SpendData {
        rows: vec![
            SpendRow {
                bucket: Some(0),
                dims: vec![Some("gpt-4o-mini".into())],
                sums: sums(3, 1_234_567),
            },
            SpendRow {
                bucket: Some(1),
                dims: vec![Some("=cmd|'/c calc'!A1, \"x\"".into())],
                sums: sums(1, 5),
            },
        ],
        totals: sums(4, 1_234_572),
        released: 2,
        truncated: false,
    };
    to_json(&p, &data)
}

#[test]
fn json_rows_carry_local_periods_and_exact_usd() {
    let v = sample();
    assert_eq!(v["timezone"], "Europe/Paris");
    assert_eq!(v["since"], "2026-02-28T23:00:00.000000Z");
    let r = &v["rows"][0];
    assert_eq!(r["period_start"], "2026-03-01T00:00:00+01:00");
    assert_eq!(r["period_end"], "2026-03-02T00:00:00+01:00");
    assert_eq!(r["model"], "gpt-4o-mini");
    assert_eq!(r["cost_micros"], 1_234_567);
    assert_eq!(r["cost_usd"], "1.234567");
    assert_eq!(v["totals"]["cost_usd"], "1.234572");
    assert_eq!(v["released_requests"], 2);
    assert_eq!(
        v["periods"],
        json!([
            {"start": "2026-03-01T00:00:00+01:00", "end": "2026-03-02T00:00:00+01:00"},
            {"start": "2026-03-02T00:00:00+01:00", "end": "2026-03-03T00:00:00+01:00"}
        ])
    );
}

#[test]
fn csv_quotes_and_defuses_formulas() {
    let csv = csv(&sample());
    let lines: Vec<&str> = csv.split("\r\n").collect();
    assert_eq!(
        lines[0],
        "period_start,period_end,model,requests,input_tokens,cached_input_tokens,cache_write_tokens,output_tokens,reasoning_tokens,cost_micros,cost_usd,estimated"
    );
    assert_eq!(
        lines[1],
        "2026-03-01T00:00:00+01:00,2026-03-02T00:00:00+01:00,gpt-4o-mini,3,3000,0,0,30,0,1234567,1.234567,0"
    );
    assert!(
        lines[2].contains(r#","'=cmd|'/c calc'!A1, ""x""","#),
        "{}",
        lines[2]
    );
    assert_eq!(lines.len(), 4, "header, two rows, final line end");
}

#[test]
fn table_is_aligned_with_a_totals_row() {
    let t = table(&sample());
    let lines: Vec<&str> = t.lines().collect();
    assert!(lines[0].contains("Europe/Paris"), "{t}");
    assert!(lines[1].starts_with("day         model"), "{t}");
    assert!(lines[3].starts_with("2026-03-01  gpt-4o-mini"), "{t}");
    // Right-aligned numbers end in the same column.
    let end = |l: &str, s: &str| l.find(s).unwrap() + s.len();
    assert_eq!(end(lines[3], "1.234567"), end(lines[6], "1.234572"), "{t}");
    assert!(lines[6].starts_with("total "), "{t}");
    assert!(lines[7].contains("released"), "{t}");
}

#[tokio::test]
async fn sqlite_sums_match_the_rows_and_skip_other_statuses() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("t.db");
    let db = crate::db::Db::open(&path, crate::config::Durability::Normal).unwrap();
    db.call(|c| {
        for (i, (status, model, at, cost)) in [
            ("settled", "a", "2026-03-01T10:00:00.000000Z", 100),
            ("settled", "a", "2026-03-01T23:59:59.999999Z", 200),
            ("settled", "b", "2026-03-02T00:00:00.000000Z", 50),
            ("released", "b", "2026-03-02T01:00:00.000000Z", 0),
            ("reserved", "b", "2026-03-02T02:00:00.000000Z", 0),
            ("settled", "a", "2026-03-03T00:00:00.000000Z", 999),
        ]
        .into_iter()
        .enumerate()
        {
            c.execute(
                "INSERT INTO billing_transactions (trace_id, key_id, upstream, model, status, input_tokens, cost_micros, usage_source, started_at, instance_id)
                 VALUES (?1, 'k_1', 'openai', ?2, ?3, 10, ?4, 'upstream', ?5, 'i')",
                rusqlite::params![format!("t{i}"), model, status, cost, at],
            )?;
        }
        Ok(())
    })
    .await
    .unwrap();
    let store = sqlite::SqliteSpend::new(&path);
    let v = report(
        &store,
        &params(&[
            ("since", "2026-03-01"),
            ("until", "2026-03-03"),
            ("group_by", "day,model"),
        ]),
        Utc.with_ymd_and_hms(2026, 3, 15, 0, 0, 0).unwrap(),
        chrono_tz::UTC,
    )
    .await
    .unwrap();
    let rows: Vec<(String, String, i64, i64)> = v["rows"]
        .as_array()
        .unwrap()
        .iter()
        .map(|r| {
            (
                r["period_start"].as_str().unwrap()[..10].to_string(),
                r["model"].as_str().unwrap().to_string(),
                r["requests"].as_i64().unwrap(),
                r["cost_micros"].as_i64().unwrap(),
            )
        })
        .collect();
    assert_eq!(
        rows,
        [
            ("2026-03-01".into(), "a".into(), 2, 300),
            ("2026-03-02".into(), "b".into(), 1, 50)
        ]
    );
    assert_eq!(v["totals"]["requests"], 3);
    assert_eq!(v["totals"]["input_tokens"], 30);
    assert_eq!(v["released_requests"], 1);
    // Truncation keeps the first rows in order and says so; totals still cover all.
    let v = report(
        &store,
        &params(&[
            ("since", "2026-03-01"),
            ("until", "2026-03-03"),
            ("group_by", "day"),
            ("limit", "1"),
        ]),
        Utc.with_ymd_and_hms(2026, 3, 15, 0, 0, 0).unwrap(),
        chrono_tz::UTC,
    )
    .await
    .unwrap();
    assert_eq!(v["rows"].as_array().unwrap().len(), 1);
    assert_eq!(v["truncated"], true);
    assert_eq!(v["totals"]["cost_micros"], 350);
    // A missing ledger file is unavailable, not an empty report.
    let missing = sqlite::SqliteSpend::new(&dir.path().join("none.db"));
    assert!(matches!(
        missing
            .spend(&plan(&SpendParams::default(), Utc::now(), chrono_tz::UTC).unwrap())
            .await,
        Err(SpendError::Unavailable(_))
    ));
}

#[test]
fn params_round_trip_through_their_pairs() {
    let p = params(&[
        ("since", "7d"),
        ("group_by", "day,model"),
        ("model", "a&b c"),
    ]);
    let pairs = p.pairs();
    assert_eq!(
        pairs,
        [
            ("since", "7d"),
            ("group_by", "day,model"),
            ("model", "a&b c")
        ]
    );
    let back = SpendParams::from_lookup(|n| pairs.iter().find(|(k, _)| *k == n).map(|(_, v)| *v));
    assert_eq!(back, p);
    assert!(pairs.iter().all(|(k, _)| SpendParams::NAMES.contains(k)));
}
