# Compiled twin of kernel/decision_wire.py: a decision's own fields as protobuf wire bytes.
# Declarations only; see decision_wire.pyx.

cpdef bytes decision_fields(str request_id, str action, str input_hash, str tenant, str idempotency_key,
                            bytes reasons, bint escalated, double confidence, tuple labels, list scores,
                            list why, unsigned long long validate_ns, unsigned long long queue_ns,
                            unsigned long long model_ns, unsigned long long policy_ns)
