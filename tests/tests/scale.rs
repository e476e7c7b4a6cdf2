//! Issue 25, correct at scale, at a size CI affords: 300 hollow Nodes
//! (realistic status, tunmesh's annotations; `tunmesh_lab::scale::hollow`)
//! beside 2 real routers in the lab's API server. Every valid Node becomes
//! a peer in both data planes; status reports change nothing (no mesh
//! update, no peer table, the same data plane); each kind of mesh change
//! lands; 300 invalid Nodes give one Event each and no more; the real
//! routers' pods talk throughout. Outcomes, not times (the harness,
//! `tunmesh-lab scale`, measures those). Root only; CI runs it.

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use tunmesh_lab::lab::{Lab, DEFAULT_ROOT};
use tunmesh_lab::netns::wait_for;
use tunmesh_lab::probe::Probe;
use tunmesh_lab::require_root;
use tunmesh_lab::scale::hollow::{self, Admin, Change, Hollow};
use tunmesh_lab::scale::{hex, lab_options, metric, router_metrics, uapi_peers, UapiPeer};

const HOLLOW: usize = 300;

fn planes(lab: &Lab) -> Vec<BTreeMap<String, UapiPeer>> {
    lab.state
        .nodes
        .iter()
        .map(|n| uapi_peers(&n.interface).expect("the router's WireGuard API"))
        .collect()
}

fn counters(lab: &Lab, name: &str) -> Vec<f64> {
    lab.state
        .nodes
        .iter()
        .map(|n| metric(&router_metrics(&n.ns).expect("metrics"), name))
        .collect()
}

/// Waits until every router's watch has seen `more` events past `before`.
fn wait_events(lab: &Lab, before: &[f64], more: f64, what: &str) {
    let done = wait_for(Duration::from_secs(120), || {
        let now = counters(lab, "tunmesh_kubernetes_watch_events_total");
        now.iter()
            .zip(before)
            .all(|(n, b)| n - b >= more)
            .then_some(())
    });
    assert!(
        done.is_some(),
        "{what}: the routers' watches saw {:?} events, {before:?} before, {more} expected",
        counters(lab, "tunmesh_kubernetes_watch_events_total")
    );
}

fn invalid_events(lab: &Lab) -> usize {
    lab.kubectl(&[
        "get",
        "events",
        "-n",
        "default",
        "--field-selector",
        "reason=InvalidPublicKey",
        "-o",
        "name",
    ])
    .unwrap_or_default()
    .lines()
    .filter(|l| l.contains("worker-"))
    .count()
}

#[test]
fn hundreds_of_nodes_cost_what_changes() {
    if !require_root("hundreds_of_nodes_cost_what_changes") {
        return;
    }
    let lab = Lab::up(&lab_options(2, DEFAULT_ROOT.into())).expect("lab up");
    let cp = lab.control_plane().unwrap().clone();
    let admin = Admin::new(&cp);
    let a = lab.pod("node-1-pod-1").unwrap().clone();
    let b = lab.pod("node-2-pod-1").unwrap().clone();
    let probe = Probe::start(&a.ns, &b.ns, b.ipv4);
    let t0 = probe.wait_echo_after(Instant::now(), "before the hollow Nodes");

    // Every valid Node becomes a peer, with its endpoint and pod CIDRs.
    let mut hollows: Vec<Hollow> = (0..HOLLOW).map(Hollow::new).collect();
    let objects: Vec<_> = hollows.iter().map(|h| h.object(40)).collect();
    let made = Instant::now();
    let took = admin
        .run(move |api| hollow::create_all(api, objects))
        .expect("creating the hollow Nodes");
    let all = wait_for(Duration::from_secs(120), || {
        let p = planes(&lab);
        p.iter().all(|d| d.len() == HOLLOW + 1).then_some(p)
    })
    .expect("every router lists every hollow Node");
    for (r, plane) in all.iter().enumerate() {
        for h in &hollows {
            let p = plane
                .get(&hex(&h.key.public_key()))
                .unwrap_or_else(|| panic!("router {r} lacks {}", hollow::name(h.index)));
            assert_eq!(
                p.endpoint,
                format!("{}:{}", hollow::ENDPOINT_IP, hollow::endpoint_port(h.index))
            );
            assert_eq!(
                p.allowed_ips,
                [hollow::pod_cidr_v4(h.index), hollow::pod_cidr_v6(h.index)]
            );
        }
    }
    eprintln!(
        "{HOLLOW} hollow Nodes: every one a peer of both routers (created in {:.2} s, in both data planes {:.2} s after the first was made)",
        took.as_secs_f64(),
        made.elapsed().as_secs_f64()
    );

    // Status reports, as kubelets send them: events arrive, nothing else.
    let events = counters(&lab, "tunmesh_kubernetes_watch_events_total");
    let changed = counters(&lab, "tunmesh_kubernetes_watch_events_changed_total");
    let updates = counters(&lab, "tunmesh_mesh_updates_total");
    let tables = counters(&lab, "tunmesh_peer_table_builds_total");
    let names: Vec<String> = (0..HOLLOW).map(hollow::name).collect();
    let sent = admin
        .run(move |api| hollow::status_churn(api, names, 60.0, 5.0))
        .expect("status reports");
    assert!(sent > 100, "{sent} status reports");
    wait_events(&lab, &events, sent as f64, "status reports");
    assert_eq!(
        counters(&lab, "tunmesh_kubernetes_watch_events_changed_total"),
        changed,
        "status reports changed what the mesh reads"
    );
    assert_eq!(
        counters(&lab, "tunmesh_mesh_updates_total"),
        updates,
        "status reports reached the router as mesh updates"
    );
    assert_eq!(
        counters(&lab, "tunmesh_peer_table_builds_total"),
        tables,
        "status reports rebuilt a peer table"
    );
    assert_eq!(planes(&lab), all, "status reports changed a data plane");
    eprintln!("{sent} status reports: seen by both routers' watches, no mesh update, no peer table, the same data planes");

    // Each kind of mesh change lands in both data planes.
    let next = tunmesh_keygen::PrivateKey::generate().public_key();
    let added = Hollow::new(HOLLOW);
    let cases = vec![
        Change::EndpointMoved {
            index: 3,
            port: 40003,
        },
        Change::KeyAnnounced {
            index: 4,
            next: next.to_base64(),
        },
        Change::Deleted { index: 5 },
        Change::Added {
            node: Box::new(added.object(40)),
        },
    ];
    hollows.push(added);
    for (change, peers) in cases
        .into_iter()
        .zip([HOLLOW + 1, HOLLOW + 1, HOLLOW, HOLLOW + 1])
    {
        let what = change.kind();
        let landed = hollow::landed(&change, &hollows).unwrap();
        let c = change.clone();
        admin
            .run(move |api| async move { hollow::apply(&api, &c).await })
            .unwrap_or_else(|e| panic!("{what}: {e:#}"));
        let ok = wait_for(Duration::from_secs(30), || {
            planes(&lab)
                .iter()
                .all(|p| landed(p) && p.len() == peers)
                .then_some(())
        });
        assert!(ok.is_some(), "{what}: not in every data plane");
        eprintln!("{what}: in both data planes");
    }

    // 300 invalid Nodes: one Event each, and no more, even as their status
    // keeps changing.
    let bad: Vec<_> = (0..HOLLOW)
        .map(|i| {
            let mut n = Hollow::new(1000 + i).object(10);
            n.metadata
                .annotations
                .get_or_insert_with(Default::default)
                .insert("tunmesh.io/public-key".into(), format!("not-a-key-{i}"));
            n
        })
        .collect();
    let events = counters(&lab, "tunmesh_kubernetes_watch_events_total");
    admin
        .run(move |api| hollow::create_all(api, bad))
        .expect("creating the invalid Nodes");
    wait_events(&lab, &events, HOLLOW as f64, "the invalid Nodes");
    let n = wait_for(Duration::from_secs(60), || {
        let n = invalid_events(&lab);
        (n >= HOLLOW).then_some(n)
    });
    assert_eq!(
        n,
        Some(HOLLOW),
        "one InvalidPublicKey Event per invalid Node"
    );
    let events = counters(&lab, "tunmesh_kubernetes_watch_events_total");
    let names: Vec<String> = (1000..1000 + HOLLOW).map(hollow::name).collect();
    let sent = admin
        .run(move |api| hollow::status_churn(api, names, 100.0, 3.0))
        .expect("status reports of the invalid Nodes");
    wait_events(
        &lab,
        &events,
        sent as f64,
        "status reports of the invalid Nodes",
    );
    assert_eq!(
        invalid_events(&lab),
        HOLLOW,
        "more Events once the invalid Nodes' status changed"
    );
    let st = lab.router_status("node-1").unwrap();
    let problems = st.kubernetes.map(|k| k.problems.len()).unwrap_or(0);
    assert_eq!(problems, HOLLOW, "node-1's status lists each problem once");
    eprintln!(
        "{HOLLOW} invalid Nodes: {HOLLOW} Events, none more after {sent} status reports of them"
    );

    // The real pods talked throughout.
    let lost = probe.lost(t0, Instant::now() - Duration::from_millis(200));
    assert!(lost.is_empty(), "probes lost: {}", lost.len());
    probe.stop();
    lab.down().unwrap();
}
