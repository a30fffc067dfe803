"""Application Load Balancers' attributes as AWS describes them.

DescribeLoadBalancerAttributes on AWS lists every attribute of an application load balancer with its
default value from the start (idle_timeout.timeout_seconds 60, routing.http2.enabled true, ...); moto
lists five and leaves out the rest, on which amazon.aws.elb_application_lb fails with a KeyError
(`idle_timeout_timeout_seconds`). A new load balancer gets AWS's documented defaults for its type; what
CreateLoadBalancer or ModifyLoadBalancerAttributes set is kept.
"""

from __future__ import annotations

from typing import Any

from moto.elbv2 import models as elbv2

# Elastic Load Balancing's user guide, "Load balancer attributes" (application load balancers)
APPLICATION_DEFAULTS: dict[str, str] = {
    "access_logs.s3.enabled": "false",
    "access_logs.s3.bucket": "",
    "access_logs.s3.prefix": "",
    "client_keep_alive.seconds": "3600",
    "connection_logs.s3.enabled": "false",
    "connection_logs.s3.bucket": "",
    "connection_logs.s3.prefix": "",
    "deletion_protection.enabled": "false",
    "idle_timeout.timeout_seconds": "60",
    "load_balancing.cross_zone.enabled": "true",
    "routing.http.desync_mitigation_mode": "defensive",
    "routing.http.drop_invalid_header_fields.enabled": "false",
    "routing.http.preserve_host_header.enabled": "false",
    "routing.http.x_amzn_tls_version_and_cipher_suite.enabled": "false",
    "routing.http.xff_client_port.enabled": "false",
    "routing.http.xff_header_processing.mode": "append",
    "routing.http2.enabled": "true",
    "waf.fail_open.enabled": "false",
}


def _load_balancer_init(original: Any) -> Any:
    def init(self: Any, *args: Any, **kwargs: Any) -> None:
        original(self, *args, **kwargs)
        if self.type == "application":
            self.attrs = {**APPLICATION_DEFAULTS, **self.attrs}

    return init


def apply() -> None:
    balancer = elbv2.FakeLoadBalancer
    balancer.__init__ = _load_balancer_init(balancer.__init__)  # type: ignore[method-assign]
