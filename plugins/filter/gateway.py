# Copyright: llmfleet contributors
# GNU General Public License v3.0+ (see https://www.gnu.org/licenses/gpl-3.0.txt)
"""The gateways' rules: llmfleet.aws.gateway_load_balanced (whether the gateways stand behind a load
balancer: the gateway role builds it, the network role then admits the users at the load balancer only) and
llmfleet.aws.gateway_endpoint (the fleet's one endpoint: the gateway role's result, the summary and the last
words of site.yml), llmfleet.aws.gateway_lb_name (the name of the load balancer and its target group,
whose rule is in module_utils/gateway_names.py: the gateway role names them with it)."""

from __future__ import annotations

from typing import Any

from ansible.errors import AnsibleFilterError
from ansible_collections.llmfleet.aws.plugins.module_utils.gateway_names import gateway_lb_name as lb_name


def gateway_load_balanced(count: Any, certificate_arn: Any = "") -> bool:
    """True when the gateways have a load balancer: more than one of them, or one with an ACM certificate
    (the load balancer's HTTPS listener holds it). No gateway (0), no load balancer."""
    try:
        count = int(count)
    except (TypeError, ValueError):
        raise AnsibleFilterError(f"gateway_load_balanced: {count!r} is not a number of gateways") from None
    if not isinstance(certificate_arn, str):
        raise AnsibleFilterError(f"gateway_load_balanced: {certificate_arn!r} is not a certificate's ARN")
    return count > 1 or (count == 1 and bool(certificate_arn))


def gateway_lb_name(deployment: Any) -> str:
    try:
        return lb_name(deployment)
    except ValueError as exc:
        raise AnsibleFilterError(str(exc)) from None


def gateway_endpoint(gateways: Any, load_balancer_dns: str = "", port: int = 8443, tls: bool = True) -> str:
    """`https://<load balancer>` when there is one (its listener is HTTPS on 443), else
    `https://<first running gateway's private address>:<port>` (http:// for a gateway without TLS, a local
    demo only), else '' (no gateway)."""
    if not isinstance(gateways, list) or not all(isinstance(g, dict) for g in gateways):
        raise AnsibleFilterError(f"gateway_endpoint: {gateways!r} is not a list of gateways")
    if not isinstance(load_balancer_dns, str):
        raise AnsibleFilterError(f"gateway_endpoint: load_balancer_dns {load_balancer_dns!r} is not a name")
    if load_balancer_dns:
        return f"https://{load_balancer_dns}"
    try:
        port = int(port)
    except (TypeError, ValueError):
        raise AnsibleFilterError(f"gateway_endpoint: port {port!r} is not a port") from None
    addresses = [
        g["private_ip"] for g in gateways if g.get("private_ip") and g.get("state", "running") == "running"
    ]
    if not addresses:
        return ""
    address = addresses[0]
    scheme = "https" if tls else "http"
    return f"{scheme}://{f'[{address}]' if ':' in address else address}:{port}"


class FilterModule:
    def filters(self) -> dict[str, Any]:
        return {
            "gateway_endpoint": gateway_endpoint,
            "gateway_lb_name": gateway_lb_name,
            "gateway_load_balanced": gateway_load_balanced,
        }
