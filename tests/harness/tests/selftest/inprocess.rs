use ferry_harness::mqtt::{self, Protocol};
use ferry_harness::{Collector, InProcessBroker};

use crate::PATIENCE;

#[tokio::test]
async fn in_process_broker_round_trips_an_mqtt_311_publish() {
    let broker = InProcessBroker::start().await.unwrap();
    let url = broker.url(Protocol::V311);
    let collector = Collector::start(&url, "ferry/#", Protocol::V311).await.unwrap();

    mqtt::publish_v311(&url, "ferry/dev1/temp", "21.5", PATIENCE).await.unwrap();

    let got = collector.wait_for(1, PATIENCE).await.unwrap();
    assert_eq!(got[0].topic, "ferry/dev1/temp");
    assert_eq!(got[0].payload_str(), "21.5");
}

#[tokio::test]
async fn in_process_broker_round_trips_an_mqtt_5_publish_with_user_properties() {
    let broker = InProcessBroker::start().await.unwrap();
    let url = broker.url(Protocol::V5);
    let collector = Collector::start(&url, "ferry/#", Protocol::V5).await.unwrap();

    let props = vec![("ce_id".to_owned(), "evt-1".to_owned())];
    mqtt::publish_v5(&url, "ferry/dev1/temp", "21.5", props.clone(), Some("text/plain".to_owned()), PATIENCE)
        .await
        .unwrap();

    let got = collector.wait_for(1, PATIENCE).await.unwrap();
    assert_eq!(got[0].payload_str(), "21.5");
    assert_eq!(got[0].user_properties, props);
    assert_eq!(got[0].content_type.as_deref(), Some("text/plain"));
}

#[tokio::test]
async fn stopping_the_in_process_broker_closes_its_listeners_and_connections() {
    let mut broker = InProcessBroker::start().await.unwrap();
    let addr = broker.addr(Protocol::V311);
    let collector = Collector::start(&broker.url(Protocol::V311), "x", Protocol::V311).await.unwrap();

    broker.stop();

    crate::wait_until_refused(addr).await;
    let deadline = tokio::time::Instant::now() + PATIENCE;
    while collector.connection_errors() == 0 {
        assert!(tokio::time::Instant::now() < deadline, "collector never saw the broker go");
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    }
}
