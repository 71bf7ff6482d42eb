//! EndpointSlice discovery against a real kube-apiserver (the e2e/k8s test
//! bed; KUBECONFIG from `e2e/k8s/controlplane.sh env`). A selector-less
//! session Service with test-managed EndpointSlices (addresses of the
//! documentation range: the API server refuses loopback). Run with
//! `cargo test --test discovery -- --ignored` (e2e/discovery/run.sh does).

#![allow(clippy::unwrap_used)] // test code: a failed unwrap is a failed test

use std::collections::BTreeSet;
use std::sync::Arc;
use std::time::{Duration, Instant};

use k8s_openapi::api::core::v1::{Namespace, Service};
use k8s_openapi::api::discovery::v1::EndpointSlice;
use kube::api::{DeleteParams, Patch, PatchParams, PostParams};
use kube::{Api, Client};
use mtproto_gateway::session::remote::{Mode, RemoteSession, RemoteSettings};
use mtproto_session::discovery::{self, Target};
use serde_json::json;

fn slice(name: &str, endpoints: &[(&str, bool)]) -> EndpointSlice {
    serde_json::from_value(json!({
        "apiVersion": "discovery.k8s.io/v1",
        "kind": "EndpointSlice",
        "metadata": {"name": name, "labels": {"kubernetes.io/service-name": "session"}},
        "addressType": "IPv4",
        "ports": [{"name": "grpc", "port": 20120, "protocol": "TCP"}],
        "endpoints": endpoints.iter().map(|(a, ready)| json!({"addresses": [a], "conditions": {"ready": ready}})).collect::<Vec<_>>(),
    }))
    .unwrap()
}

async fn wait_for(session: &RemoteSession, expected: &[&str]) -> Duration {
    let want: BTreeSet<String> = expected.iter().map(|s| s.to_string()).collect();
    let started = Instant::now();
    loop {
        let have: BTreeSet<String> = session.members().into_iter().collect();
        if have == want {
            return started.elapsed();
        }
        assert!(
            started.elapsed() < Duration::from_secs(20),
            "ring stayed {have:?}, wanted {want:?}"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "needs the e2e/k8s control plane"]
async fn the_ring_follows_endpoint_slices() {
    let client = Client::try_default()
        .await
        .expect("KUBECONFIG for the test control plane");
    let ns = format!("discovery-{}", rand::random::<u32>());
    let namespaces: Api<Namespace> = Api::all(client.clone());
    namespaces
        .create(
            &PostParams::default(),
            &serde_json::from_value(json!({"metadata": {"name": ns}})).unwrap(),
        )
        .await
        .unwrap();
    let services: Api<Service> = Api::namespaced(client.clone(), &ns);
    let service: Service = serde_json::from_value(json!({
        "metadata": {"name": "session"},
        "spec": {"ports": [{"name": "grpc", "port": 20120}]},
    }))
    .unwrap();
    services
        .create(&PostParams::default(), &service)
        .await
        .unwrap();
    let slices: Api<EndpointSlice> = Api::namespaced(client.clone(), &ns);
    slices
        .create(
            &PostParams::default(),
            &slice("session-a", &[("192.0.2.5", true), ("192.0.2.6", true)]),
        )
        .await
        .unwrap();

    let session = Arc::new(RemoteSession::new(
        Vec::new(),
        RemoteSettings {
            mode: Mode::Unary,
            call_timeout: Duration::from_secs(1),
            retries: 0,
            backoff: Duration::from_millis(10),
        },
        Default::default(),
    ));
    let target = Target {
        namespace: ns.clone(),
        service: "session".into(),
        port_name: Some("grpc".into()),
        not_ready_grace: Duration::from_millis(500),
    };
    let ring = session.clone();
    let watcher = tokio::spawn(discovery::run(client.clone(), target, move |members| {
        ring.set_members(members)
    }));
    wait_for(&session, &["192.0.2.5:20120", "192.0.2.6:20120"]).await;

    // Scale out: a second slice; the time from the API write to the ring is measured.
    let started = Instant::now();
    slices
        .create(
            &PostParams::default(),
            &slice("session-b", &[("192.0.2.7", true)]),
        )
        .await
        .unwrap();
    wait_for(
        &session,
        &["192.0.2.5:20120", "192.0.2.6:20120", "192.0.2.7:20120"],
    )
    .await;
    println!("endpoint added -> ring updated in {:?}", started.elapsed());

    // NotReady beyond the grace leaves; removal from a slice leaves.
    let patch = Patch::Apply(slice(
        "session-a",
        &[("192.0.2.5", true), ("192.0.2.6", false)],
    ));
    slices
        .patch(
            "session-a",
            &PatchParams::apply("discovery-test").force(),
            &patch,
        )
        .await
        .unwrap();
    wait_for(&session, &["192.0.2.5:20120", "192.0.2.7:20120"]).await;
    let started = Instant::now();
    slices
        .delete("session-b", &DeleteParams::default())
        .await
        .unwrap();
    wait_for(&session, &["192.0.2.5:20120"]).await;
    println!("slice deleted -> ring updated in {:?}", started.elapsed());

    watcher.abort();
    namespaces
        .delete(&ns, &DeleteParams::default())
        .await
        .unwrap();
}
