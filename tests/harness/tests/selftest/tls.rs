use ferry_harness::mqtt::{self, Protocol};
use ferry_harness::tls::{self, TestPki};
use ferry_harness::{Collector, Mosquitto, MosquittoOptions, TlsListener};

use crate::PATIENCE;

async fn tls_broker(pki: &TestPki, require_certificate: bool) -> Mosquitto {
    Mosquitto::start(MosquittoOptions { tls: Some(pki.mosquitto_listener(require_certificate)), ..Default::default() })
        .await
        .unwrap()
}

async fn connect(broker: &Mosquitto, config: std::sync::Arc<rustls::ClientConfig>) -> anyhow::Result<()> {
    let url = broker.tls_url().unwrap();
    let opts = mqtt::options_v311(&url, &mqtt::unique_client_id("tls"), Some(config))?;
    mqtt::try_connect(opts, PATIENCE).await
}

#[tokio::test]
async fn a_client_trusting_the_test_ca_round_trips_over_the_tls_listener() {
    let pki = TestPki::generate().unwrap();
    let broker = tls_broker(&pki, false).await;
    let config = tls::client_config(&pki.ca_cert, None).unwrap();
    let collector =
        Collector::start_with_tls(&broker.tls_url().unwrap(), "secure/#", Protocol::V5, Some(config)).await.unwrap();

    mqtt::publish_v311(&broker.url(), "secure/a", "over tls", PATIENCE).await.unwrap();

    let got = collector.wait_for(1, PATIENCE).await.unwrap();
    assert_eq!(got[0].payload_str(), "over tls");
}

#[tokio::test]
async fn a_client_trusting_only_the_rogue_ca_is_rejected() {
    let pki = TestPki::generate().unwrap();
    let broker = tls_broker(&pki, false).await;
    let config = tls::client_config(&pki.rogue_ca_cert, None).unwrap();

    let err = connect(&broker, config).await.unwrap_err();

    let msg = format!("{err:#}");
    assert!(msg.contains("UnknownIssuer"), "{msg}");
}

#[tokio::test]
async fn a_server_with_the_rogue_certificate_is_rejected_by_a_client_trusting_the_test_ca() {
    let pki = TestPki::generate().unwrap();
    let broker = Mosquitto::start(MosquittoOptions {
        tls: Some(TlsListener {
            ca: pki.rogue_ca_cert.clone(),
            cert: pki.rogue_server_cert.clone(),
            key: pki.rogue_server_key.clone(),
            require_certificate: false,
        }),
        ..Default::default()
    })
    .await
    .unwrap();
    let config = tls::client_config(&pki.ca_cert, None).unwrap();

    let err = connect(&broker, config).await.unwrap_err();

    assert!(format!("{err:#}").contains("UnknownIssuer"), "{err:#}");
}

#[tokio::test]
async fn mtls_listener_accepts_a_client_with_the_test_client_certificate() {
    let pki = TestPki::generate().unwrap();
    let broker = tls_broker(&pki, true).await;
    let config = tls::client_config(&pki.ca_cert, Some((&pki.client_cert, &pki.client_key))).unwrap();

    connect(&broker, config).await.unwrap();
}

#[tokio::test]
async fn mtls_listener_rejects_a_client_without_a_certificate() {
    let pki = TestPki::generate().unwrap();
    let broker = tls_broker(&pki, true).await;
    let config = tls::client_config(&pki.ca_cert, None).unwrap();

    let result = connect(&broker, config).await;

    let msg = format!("{:#}", result.expect_err("connected without a client certificate"));
    // The server's TLS 1.3 alert, not a timeout or an unrelated I/O error.
    assert!(msg.contains("CertificateRequired"), "{msg}");
}
