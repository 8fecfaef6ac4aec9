-- Every sharded table carries the shard key (customer_id) in its primary key, so rows of one
-- customer live together and can later move between shards with logical replication.
CREATE TABLE customers (
    customer_id bigint PRIMARY KEY,
    name        text NOT NULL,
    created_at  timestamptz NOT NULL DEFAULT now()
);

CREATE TABLE orders (
    customer_id bigint NOT NULL REFERENCES customers (customer_id),
    order_id    bigint NOT NULL,
    amount      numeric(12, 2) NOT NULL,
    placed_at   timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (customer_id, order_id)
);

CREATE INDEX orders_placed_at ON orders (placed_at);
