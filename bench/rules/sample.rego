package tollgate
import rego.v1

default allow := false

blocked := {"delete_customer_record", "access_payment_raw", "bulk_send_email"}

allow if {
    input.tool == "read_customer_record"
    not blocked[input.tool]
    regex.match(`^C[0-9]{6}$`, input.args.customer_id)
    every k, _ in input.args { k == "customer_id" }
}

allow if {
    input.tool == "update_order_status"
    input.args.status in {"cancelled", "refunded", "processing"}
    count(input.args.order_ids) <= 10
    every id in input.args.order_ids { startswith(id, "O-") }
}
