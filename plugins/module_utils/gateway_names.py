# Copyright: llmfleet developers
# GNU General Public License v3.0+ (see https://www.gnu.org/licenses/gpl-3.0.txt)

"""The names of a deployment's gateway resources, in one place: the filter llmfleet.aws.gateway_lb_name
(the gateway role names its load balancer and target group with it) and the module
llmfleet.aws.gateway_lb_info (the summary, teardown and the role find them by it)."""

from __future__ import annotations

import re


def gateway_lb_name(deployment: object) -> str:
    """`<deployment>-gw`, the deployment cut to 29 characters (load balancers and target groups take at most
    32) and without a dash at the end (AWS refuses one before the suffix's). ValueError for a non-name."""
    if not isinstance(deployment, str) or not deployment:
        raise ValueError(f"gateway_lb_name: {deployment!r} is not a deployment name")
    return re.sub(r"-+$", "", deployment[:29]) + "-gw"
