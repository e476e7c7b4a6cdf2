//! The bench's report: ratios inside each repetition, the summaries over
//! repetitions, the headline, and the table printed.

use std::collections::BTreeMap;

use super::*;

/// Ratios inside each repetition, summaries over them, and the headline.
pub fn report(
    mut rows: Vec<Row>,
    missing: BTreeMap<String, String>,
    orders: Vec<Vec<String>>,
    versions: BTreeMap<String, String>,
    configs: &[String],
    tests: &[String],
) -> Report {
    let of = |rows: &[Row], cfg: &str| -> BTreeMap<(u32, String), f64> {
        rows.iter()
            .filter(|r| r.config == cfg && r.gbps > 0.0)
            .map(|r| ((r.rep, r.test.clone()), r.gbps))
            .collect()
    };
    let raw = of(&rows, "raw");
    let wggo_new = of(&rows, HEADLINE_PEER);
    for r in &mut rows {
        let key = (r.rep, r.test.clone());
        r.ratio = raw.get(&key).map(|v| r.gbps / v);
        r.vs_wggo_new = wggo_new.get(&key).map(|v| r.gbps / v);
    }
    let mut summaries = Vec::new();
    for test in tests {
        for cfg in configs {
            let rs: Vec<&Row> = rows
                .iter()
                .filter(|r| &r.config == cfg && &r.test == test)
                .collect();
            let Some(gbps) = Spread::of(&rs.iter().map(|r| r.gbps).collect::<Vec<_>>()) else {
                continue;
            };
            let med = |f: &dyn Fn(&Row) -> f64| {
                Spread::of(&rs.iter().map(|r| f(r)).collect::<Vec<_>>())
                    .map(|s| s.median)
                    .unwrap_or(0.0)
            };
            let opt = |f: &dyn Fn(&Row) -> Option<f64>| {
                Spread::of(&rs.iter().filter_map(|r| f(r)).collect::<Vec<_>>())
            };
            summaries.push(Summary {
                config: cfg.clone(),
                test: test.clone(),
                reps: rs.len(),
                gbps,
                ratio: opt(&|r| r.ratio),
                vs_wggo_new: opt(&|r| r.vs_wggo_new),
                daemon_cpu: med(&|r| r.daemon_cpu),
                cpu_s_per_gbit: opt(&|r| r.cpu_s_per_gbit).map(|s| s.median),
                machine_idle: med(&|r| r.machine_idle),
                retr_or_loss: med(&|r| r.retr_or_loss),
                udp_rcvbuf_errors: med(&|r| r.udp_rcvbuf_errors as f64) as u64,
                tun_drops: med(&|r| r.tun_drops as f64) as u64,
            });
        }
    }
    let headline = headline(&summaries, &missing, configs, tests);
    Report {
        rows,
        summaries,
        missing,
        orders,
        headline,
        versions,
        latency: Vec::new(),
        latency_summaries: Vec::new(),
    }
}

/// tunmesh against the newer wireguard-go on tcp1, or why not.
pub(super) fn headline(
    summaries: &[Summary],
    missing: &BTreeMap<String, String>,
    configs: &[String],
    tests: &[String],
) -> Headline {
    let na = |why: &str| Headline::NotAvailable { why: why.into() };
    if !tests.iter().any(|t| t == HEADLINE_TEST) {
        return na(&format!("{HEADLINE_TEST} not measured"));
    }
    for (cfg, name) in [
        (HEADLINE_PEER, "newer wireguard-go"),
        ("tunmesh", "tunmesh"),
    ] {
        if !configs.iter().any(|c| c == cfg) {
            return na(&format!("{name} not measured"));
        }
        let measured = summaries
            .iter()
            .any(|s| s.config == cfg && s.test == HEADLINE_TEST);
        if missing.contains_key(cfg) && !measured {
            return na(&format!("{name} missing"));
        }
    }
    summaries
        .iter()
        .find(|s| s.config == "tunmesh" && s.test == HEADLINE_TEST)
        .and_then(|s| s.vs_wggo_new)
        .map(Headline::Measured)
        .unwrap_or_else(|| na("no repetition measured both tunmesh and the newer wireguard-go"))
}

/// The readable table.
pub fn table(r: &Report) -> String {
    let mut s = String::from(
        "Gbit/s = receiver goodput (UDP too), median over repetitions\n\
         ratio = Gbit/s / raw veth, and vs wggo_new = Gbit/s / the newer wireguard-go, each taken inside one\n\
         repetition: median [min-max] of those per-repetition ratios; configuration order rotated every repetition\n\
         daemons = both tunnel daemons' CPU, % of one core; CPU s/Gbit = daemon CPU seconds per Gbit that arrived\n\
         idle = the machine's idle CPU during the test, % of all its CPUs\n\
         retr|loss = TCP retransmits or UDP loss % at the receiver; rcvbuf = UDP receive-buffer errors; tundrop = TUN tx_dropped\n\n",
    );
    let spread = |x: Option<Spread>| {
        x.map(|v| format!("{:.3} [{:.3}-{:.3}]", v.median, v.min, v.max))
            .unwrap_or_else(|| "-".into())
    };
    s += &format!(
        "{:10} {:5} {:>4} {:>8} {:>21} {:>21} {:>8} {:>10} {:>5} {:>10} {:>7} {:>8}\n",
        "config",
        "test",
        "reps",
        "Gbit/s",
        "ratio",
        "vs wggo_new",
        "daemons",
        "CPU s/Gbit",
        "idle",
        "retr|loss",
        "rcvbuf",
        "tundrop"
    );
    let mut last = String::new();
    for x in &r.summaries {
        if x.test != last && !last.is_empty() {
            s += "\n";
        }
        last = x.test.clone();
        s += &format!(
            "{:10} {:5} {:>4} {:>8.2} {:>21} {:>21} {:>7.0}% {:>10} {:>4.0}% {:>10.1} {:>7} {:>8}\n",
            x.config,
            x.test,
            x.reps,
            x.gbps.median,
            spread(x.ratio),
            spread(x.vs_wggo_new),
            x.daemon_cpu,
            x.cpu_s_per_gbit
                .map(|v| format!("{v:.3}"))
                .unwrap_or_else(|| "-".into()),
            x.machine_idle,
            x.retr_or_loss,
            x.udp_rcvbuf_errors,
            x.tun_drops
        );
    }
    for (cfg, why) in &r.missing {
        s += &format!("\nmissing: {cfg}: {why}");
    }
    if !r.missing.is_empty() {
        s += "\n";
    }
    s += "\norders: ";
    s += &r
        .orders
        .iter()
        .map(|o| o.join(","))
        .collect::<Vec<_>>()
        .join(" | ");
    s += "\nversions: ";
    s += &r
        .versions
        .iter()
        .map(|(k, v)| format!("{k}: {v}"))
        .collect::<Vec<_>>()
        .join("; ");
    s += "\n";
    s
}
