//! End-to-end tests: the real binaries against a real RabbitMQ. One test binary, with a
//! [`helpers`] module that gives every test its own queues, log dir and ports.

mod helpers;
mod pipeline_flow;
