CREATE TABLE refunds (
    customer_id bigint NOT NULL,
    refund_id   bigint NOT NULL,
    order_id    bigint NOT NULL,
    amount      numeric(12, 2) NOT NULL,
    PRIMARY KEY (customer_id, refund_id),
    FOREIGN KEY (customer_id, order_id) REFERENCES orders (customer_id, order_id)
);
