//! The boringtun patch (third_party/boringtun/TUNMESH-PATCH.md): a tunnel's
//! sessions exported from one `Tunn` and imported into another go on with
//! the same peer without a handshake, no nonce used twice, replays refused.

use boringtun::noise::{Tunn, TunnResult};
use boringtun::x25519::{PublicKey, StaticSecret};
use tunmesh_router::PrivateKey;

fn secret() -> StaticSecret {
    StaticSecret::from(*PrivateKey::generate().as_bytes())
}

fn pair() -> (Tunn, Tunn, StaticSecret, PublicKey) {
    let (a_key, b_key) = (secret(), secret());
    let (a_pub, b_pub) = (PublicKey::from(&a_key), PublicKey::from(&b_key));
    let a = Tunn::new(a_key.clone(), b_pub, None, None, 1, None);
    let b = Tunn::new(b_key, a_pub, None, None, 2, None);
    (a, b, a_key, b_pub)
}

/// A minimal IPv4 packet (header only) with `id` in its id field.
fn packet(id: u16) -> Vec<u8> {
    let mut p = vec![0u8; 20];
    p[0] = 0x45;
    p[2..4].copy_from_slice(&20u16.to_be_bytes());
    p[4..6].copy_from_slice(&id.to_be_bytes());
    p[12..16].copy_from_slice(&[10, 0, 0, 1]);
    p[16..20].copy_from_slice(&[10, 0, 0, 2]);
    p
}

fn seal(t: &mut Tunn, p: &[u8]) -> Vec<u8> {
    let mut buf = [0u8; 256];
    match t.encapsulate(p, &mut buf) {
        TunnResult::WriteToNetwork(d) => d.to_vec(),
        other => panic!("{other:?}"),
    }
}

fn open(t: &mut Tunn, d: &[u8]) -> Result<Vec<u8>, String> {
    let mut buf = [0u8; 256];
    match t.decapsulate(None, d, &mut buf) {
        TunnResult::WriteToTunnelV4(p, _) => Ok(p.to_vec()),
        other => Err(format!("{other:?}")),
    }
}

fn handshake(a: &mut Tunn, b: &mut Tunn) {
    let mut buf = [0u8; 256];
    let init = match a.format_handshake_initiation(&mut buf, false) {
        TunnResult::WriteToNetwork(d) => d.to_vec(),
        other => panic!("{other:?}"),
    };
    let mut buf2 = [0u8; 256];
    let resp = match b.decapsulate(None, &init, &mut buf2) {
        TunnResult::WriteToNetwork(d) => d.to_vec(),
        other => panic!("{other:?}"),
    };
    let mut buf3 = [0u8; 256];
    // The initiator answers with a keepalive, which confirms the session.
    let keepalive = match a.decapsulate(None, &resp, &mut buf3) {
        TunnResult::WriteToNetwork(d) => d.to_vec(),
        other => panic!("{other:?}"),
    };
    let mut buf4 = [0u8; 256];
    assert!(matches!(
        b.decapsulate(None, &keepalive, &mut buf4),
        TunnResult::Done
    ));
}

#[test]
fn an_imported_tunnel_goes_on_without_a_handshake() {
    let (mut a, mut b, a_key, b_pub) = pair();
    handshake(&mut a, &mut b);
    let early = seal(&mut a, &packet(1));
    assert_eq!(open(&mut b, &early).unwrap(), packet(1));
    let from_b = seal(&mut b, &packet(2));
    assert_eq!(open(&mut a, &from_b).unwrap(), packet(2));
    let since = a.time_since_last_handshake().unwrap();

    // A hands over to A2: same keys, same index.
    let st = a.export_state(1000);
    let mut a2 = Tunn::new(a_key, b_pub, None, None, 1, None);
    a2.import_state(&st).unwrap();
    let without_age = |st: &boringtun::noise::state::TunnState| {
        let mut s = st.sessions.clone();
        s.iter_mut().for_each(|(_, s)| s.age = Default::default());
        s
    };
    assert_eq!(without_age(&a2.export_state(0)), without_age(&st));
    assert!(a2.time_since_last_handshake().unwrap() >= since);

    // A2 talks to B on the same session, both ways, no handshake.
    let d = seal(&mut a2, &packet(3));
    assert_eq!(d[0], 4, "a data message, not a handshake");
    assert_eq!(open(&mut b, &d).unwrap(), packet(3));
    let back = seal(&mut b, &packet(4));
    assert_eq!(open(&mut a2, &back).unwrap(), packet(4));
    // Its counter is past the margin: never one A used.
    let counter = u64::from_le_bytes(d[8..16].try_into().unwrap());
    assert!(counter >= 1000, "{counter}");
    // A replay of what B sent before the handover stays refused.
    assert!(open(&mut a2, &from_b).is_err());
    // What A might still send after the export stays below A2's counters.
    let late = seal(&mut a, &packet(5));
    let late_counter = u64::from_le_bytes(late[8..16].try_into().unwrap());
    assert!(late_counter < counter, "{late_counter} >= {counter}");
}

#[test]
fn a_state_that_does_not_fit_is_refused_whole() {
    let (mut a, mut b, a_key, b_pub) = pair();
    handshake(&mut a, &mut b);
    let mut st = a.export_state(0);
    st.sessions[0].1.replay_bitmap.clear();
    let mut a2 = Tunn::new(a_key.clone(), b_pub, None, None, 1, None);
    assert!(a2.import_state(&st).is_err());
    assert!(a2.time_since_last_handshake().is_none());
    let mut st = a.export_state(0);
    st.sessions[0].0 += 1;
    assert!(a2.import_state(&st).is_err());
}

#[test]
fn a_smaller_replay_window_is_carried_over_counter_by_counter() {
    // A router whose boringtun keeps 1024 (16 words) hands over to one
    // keeping 8192: what the old window saw stays refused.
    let (a_key, b_key) = (secret(), secret());
    let (a_pub, b_pub) = (PublicKey::from(&a_key), PublicKey::from(&b_key));
    let mut a = Tunn::new(a_key, b_pub, None, None, 1, None);
    let mut b = Tunn::new(b_key.clone(), a_pub, None, None, 2, None);
    handshake(&mut a, &mut b);
    let sent: Vec<Vec<u8>> = (0..100).map(|i| seal(&mut a, &packet(i))).collect();
    for d in &sent {
        open(&mut b, d).unwrap();
    }
    // B hands over with a 16-word bitmap, as an upstream-sized build would.
    let mut st = b.export_state(0);
    for (_, s) in st.sessions.iter_mut() {
        s.replay_bitmap.truncate(16);
    }
    let mut b2 = Tunn::new(b_key, a_pub, None, None, 2, None);
    b2.import_state(&st).unwrap();
    assert!(open(&mut b2, &sent[50]).is_err(), "a replay got through");
    let d = seal(&mut a, &packet(200));
    assert_eq!(open(&mut b2, &d).unwrap(), packet(200));
}
