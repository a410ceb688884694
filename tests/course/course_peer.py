#!/usr/bin/env python3
"""A service of the course's Python version, for the end-to-end test of TOPOLOGY=course.

It talks to RabbitMQ exactly as the course code does: pika, `queue_declare(queue=name)` with the
default arguments (non-durable, no arguments), bare JSON bodies (a list of numbers for `features`,
a number for `y_true` and `y_pred`), no message id or other properties, `auto_ack=True`.
What it adds is for the test only: queue names, a stop after COUNT messages, a time limit, and
(role metric) a file with what it received.

Roles:
  features  publishes rows 0..COUNT-1 of DATA (header row, target in the last column)
  model     predicts with the coefficients of a model artifact (`model train`) and publishes y_pred
  metric    appends `<queue kind> <message_id or -> <body>` per message received to OUT
"""

import argparse
import csv
import json
import sys

import pika


def parse_args():
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("role", choices=["features", "model", "metric"])
    parser.add_argument("--url", required=True, help="AMQP URL of the broker")
    parser.add_argument("--features-queue", required=True)
    parser.add_argument("--y-true-queue", required=True)
    parser.add_argument("--y-pred-queue", required=True)
    parser.add_argument("--count", type=int, required=True, help="messages to send or take")
    parser.add_argument("--data", help="CSV to stream (role features)")
    parser.add_argument("--model", help="model artifact JSON (role model)")
    parser.add_argument("--out", help="file of received messages (role metric)")
    parser.add_argument("--timeout", type=float, default=120.0, help="give up after this long")
    return parser.parse_args()


def connect(url):
    return pika.BlockingConnection(pika.URLParameters(url))


def features(args, channel):
    channel.queue_declare(queue=args.y_true_queue)
    channel.queue_declare(queue=args.features_queue)
    with open(args.data, newline="") as file:
        rows = list(csv.reader(file))[1:]
    for row in rows[: args.count]:
        values = [float(v) for v in row]
        x, y = values[:-1], values[-1]
        channel.basic_publish(exchange="", routing_key=args.y_true_queue, body=json.dumps(y))
        channel.basic_publish(exchange="", routing_key=args.features_queue, body=json.dumps(x))
    print(f"features: sent {args.count} samples", flush=True)
    return True


def consume(args, channel, queues, on_body, expected):
    """basic_consume with auto_ack as the course does; stops after `expected` messages."""
    seen = 0

    def callback(ch, method, properties, body):
        nonlocal seen
        on_body(method.routing_key, properties, body)
        seen += 1
        if seen >= expected:
            ch.stop_consuming()

    for queue in queues:
        channel.basic_consume(queue=queue, on_message_callback=callback, auto_ack=True)
    channel.connection.call_later(args.timeout, channel.stop_consuming)
    print(f"{args.role}: consuming {', '.join(queues)}", flush=True)
    channel.start_consuming()
    print(f"{args.role}: {seen} messages of {expected}", flush=True)
    return seen >= expected


def model(args, channel):
    with open(args.model) as file:
        artifact = json.load(file)
    coefficients, intercept = artifact["coefficients"], artifact["intercept"]
    channel.queue_declare(queue=args.features_queue)
    channel.queue_declare(queue=args.y_pred_queue)

    def predict(_queue, _properties, body):
        x = json.loads(body)
        y_pred = intercept + sum(c * v for c, v in zip(coefficients, x))
        channel.basic_publish(exchange="", routing_key=args.y_pred_queue, body=json.dumps(y_pred))

    return consume(args, channel, [args.features_queue], predict, args.count)


def metric(args, channel):
    channel.queue_declare(queue=args.y_true_queue)
    channel.queue_declare(queue=args.y_pred_queue)
    kinds = {args.y_true_queue: "y_true", args.y_pred_queue: "y_pred"}
    out = open(args.out, "a")

    def log(queue, properties, body):
        value = json.loads(body)
        out.write(f"{kinds[queue]} {properties.message_id or '-'} {json.dumps(value)}\n")
        out.flush()

    return consume(args, channel, [args.y_true_queue, args.y_pred_queue], log, 2 * args.count)


def main():
    args = parse_args()
    connection = connect(args.url)
    channel = connection.channel()
    done = {"features": features, "model": model, "metric": metric}[args.role](args, channel)
    connection.close()
    return 0 if done else 1


if __name__ == "__main__":
    sys.exit(main())
