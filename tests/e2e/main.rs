//! End-to-end tests: the real binaries against a real RabbitMQ. One test binary, with a
//! [`helpers`] module that gives every test its own queues, log dir and ports, and a
//! [`broker_node`] module (from `testkit`) for tests that need a broker of their own to stop and restart.

mod alarms;
mod audit;
mod bad_input;
mod chart;
mod classification;
/// The private broker nodes, shared with the benchmark.
use testkit::broker_node;
mod blocked;
mod course;
mod dashboard;
mod deployment;
mod disk_full;
mod docs;
mod drift;
mod faults;
mod helpers;
mod model_url;
mod monitoring;
mod network_cut;
mod node_loss;
mod observability;
mod own_model;
mod partitioned_cluster;
mod partitions;
mod pipeline_flow;
mod producer;
mod recovery;
mod scaling;
mod secrets;
mod supervisor;
mod tls;
mod trainer;
