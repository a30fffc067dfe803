"""Launching and starting instances in the emulator as AWS does: capacity, vCPU quotas, interface groups.

AWS behaviours moto does not have, applied by server.py:

- InsufficientInstanceCapacity. AWS has no capacity of an instance type in an Availability Zone at times
  (GPU types above all): RunInstances and StartInstances then answer HTTP 500 with the code
  InsufficientInstanceCapacity ("We currently do not have sufficient g6.xlarge capacity in the
  Availability Zone you requested (us-east-1a). ..."). moto always has capacity. Here the types and
  zones listed in the control below have none: a launch there, or a start of a stopped instance of that
  type there, answers that error and changes nothing. A launch that names no zone (no subnet, no
  placement) goes where there is capacity, as on AWS, so only a rule without a zone stops it. AWS may also
  accept the request and the instance then ends terminated (a launch) or stopped (a start) with the state
  reason Server.InsufficientInstanceCapacity: a rule with "accepted": true does that instead.
- Service Quotas for EC2's vCPU quotas. GetServiceQuota(ec2, L-DB2E81BA) and the other per-family
  "Running On-Demand ... instances" and "All ... Spot Instance Requests" quotas answer as AWS does (the
  account's value, in vCPUs); moto knew only VPC quotas and answered NoSuchResourceException. Each
  starts at a value generous enough for the tests (DEFAULT_VCPUS); the control below sets it.
- DescribeInstanceAttribute groupSet answers the groups of the instance's primary network interface, as on
  AWS; moto answered only groups given outside NetworkInterfaces (none, for an instance launched with its
  groups on its interface, as AWS requires when an interface is given), and amazon.aws.ec2_instance then
  "changed" every such instance's groups on every run.

The control, beside moto's own /moto-api (JSON in and out; /moto-api/reset restores the defaults):

    GET  /llmfleet-emulator/capacity
    POST /llmfleet-emulator/capacity  {"unavailable": [{"instance_type": "g6.xlarge",
                                                         "availability_zone": "us-east-1a"}, ...]}
         the whole list: a rule without availability_zone is every zone, without instance_type every type;
         "accepted": true takes the request, then the instance ends terminated or stopped (no capacity)
    GET  /llmfleet-emulator/quotas
    POST /llmfleet-emulator/quotas    {"ec2": {"L-DB2E81BA": 8}}   (null: back to the default)
"""

from __future__ import annotations

import json
import threading
from collections.abc import Callable
from typing import Any

from moto.ec2.models import instances as ec2_instances
from moto.moto_api._internal.models import MotoAPIBackend
from moto.moto_server.werkzeug_app import DomainDispatcherApplication
from moto.servicequotas.models import ServiceQuotasBackend
from werkzeug.exceptions import HTTPException
from werkzeug.wrappers import Request, Response

PREFIX = "/llmfleet-emulator/"
DEFAULT_VCPUS = 1024.0
EC2_SERVICE_NAME = "Amazon Elastic Compute Cloud (Amazon EC2)"
# EC2's vCPU quotas per instance family, by quota code, as Service Quotas names them
EC2_VCPU_QUOTAS = {
    "L-1216C47A": "Running On-Demand Standard (A, C, D, H, I, M, R, T, Z) instances",
    "L-DB2E81BA": "Running On-Demand G and VT instances",
    "L-417A185B": "Running On-Demand P instances",
    "L-34B43A08": "All Standard (A, C, D, H, I, M, R, T, Z) Spot Instance Requests",
    "L-3819A6DF": "All G and VT Spot Instance Requests",
    "L-7212CCBC": "All P Spot Instance Requests",
}

_lock = threading.Lock()
_unavailable: list[dict[str, str]] = []
_quotas: dict[str, dict[str, float]] = {}


def reset() -> None:
    with _lock:
        _unavailable.clear()
        _quotas.clear()
        _quotas["ec2"] = dict.fromkeys(EC2_VCPU_QUOTAS, DEFAULT_VCPUS)


reset()


class InsufficientInstanceCapacity(HTTPException):
    """EC2's answer when a type has no capacity in a zone: HTTP 500, the EC2 error document."""

    code = 500

    def __init__(self, instance_type: str, zone: str) -> None:
        message = (
            f"We currently do not have sufficient {instance_type} capacity in the Availability Zone you "
            f"requested ({zone}). Our system will be working on provisioning additional capacity. You can "
            f"currently get {instance_type} capacity by not specifying an Availability Zone in your request "
            "or choosing another Availability Zone."
        )
        super().__init__(
            "<?xml version='1.0' encoding='UTF-8'?><Response><Errors><Error>"
            f"<Code>InsufficientInstanceCapacity</Code><Message>{message}</Message></Error></Errors>"
            "<RequestID>llmfleet-emulator</RequestID></Response>"
        )

    def get_headers(self, *args: Any, **kwargs: Any) -> list[tuple[str, str]]:
        return [("Content-Type", "text/xml")]


def without_capacity(instance_type: str, zone: str | None) -> dict[str, Any] | None:
    """The rule that leaves no capacity of `instance_type` in `zone` (None: any zone the caller did not
    choose, which only a rule for every zone takes away), or None."""
    with _lock:
        rules = list(_unavailable)
    for rule in rules:
        if rule.get("instance_type", instance_type) != instance_type:
            continue
        if "availability_zone" not in rule or (zone is not None and rule["availability_zone"] == zone):
            return rule
    return None


def _capacity_state_reason() -> Any:
    return ec2_instances.StateReason(
        "Server.InsufficientInstanceCapacity: Insufficient capacity.", "Server.InsufficientInstanceCapacity"
    )


def _launch_zone(backend: Any, kwargs: dict[str, Any]) -> str | None:
    subnet_id = kwargs.get("subnet_id") or next(
        (nic["SubnetId"] for nic in kwargs.get("nics") or [] if nic.get("SubnetId")), None
    )
    if subnet_id:
        return str(backend.get_subnet(subnet_id).availability_zone)
    return kwargs.get("placement") or None


def _run_instances(original: Callable[..., Any]) -> Callable[..., Any]:
    def run(
        self: Any, image_id: Any, count: int, user_data: Any, security_group_names: Any, **kwargs: Any
    ) -> Any:
        instance_type = kwargs.get("instance_type")
        if kwargs.get("is_instance_type_default") and kwargs.get("launch_template"):
            template = self._get_template_from_args(kwargs["launch_template"]).data
            instance_type = template.get("InstanceType") or instance_type
        zone = _launch_zone(self, kwargs)
        rule = without_capacity(instance_type, zone) if instance_type else None
        if rule is not None and not rule.get("accepted"):
            raise InsufficientInstanceCapacity(instance_type, zone or f"{self.region_name}a")
        reservation = original(self, image_id, count, user_data, security_group_names, **kwargs)
        if rule is not None:  # accepted, then no capacity after all
            for instance in reservation.instances:
                instance.terminate()
                instance.state_reason = _capacity_state_reason()
        return reservation

    return run


def _start_instances(original: Callable[..., Any]) -> Callable[..., Any]:
    def start(self: Any, instance_ids: list[str]) -> Any:
        accepted = []
        for instance in self.get_multi_instances_by_id(instance_ids):
            zone = instance.placement.zone
            rule = without_capacity(instance.instance_type, zone) if instance.state == "stopped" else None
            if rule is not None and not rule.get("accepted"):
                raise InsufficientInstanceCapacity(instance.instance_type, zone)
            if rule is not None:
                accepted.append(instance)
        started = original(self, instance_ids)
        for instance in accepted:  # accepted, then no capacity after all: stopped again
            instance.stop()
            instance.state_reason = _capacity_state_reason()
        return started

    return start


def _describe_instance_attribute(original: Callable[..., Any]) -> Callable[..., Any]:
    def describe(self: Any, instance_id: str, attribute: str) -> Any:
        instance, value = original(self, instance_id, attribute)
        primary = getattr(instance, "nics", {}).get(0)
        if attribute == "groupSet" and primary is not None:
            value = list(primary.group_set)
        return instance, value

    return describe


def _get_service_quota(original: Callable[..., Any]) -> Callable[..., Any]:
    def get(self: Any, service_code: str, quota_code: str) -> dict[str, Any]:
        with _lock:
            value = _quotas.get(service_code, {}).get(quota_code)
        if service_code != "ec2" or value is None:
            return original(self, service_code, quota_code)  # type: ignore[no-any-return]
        return {
            "ServiceCode": "ec2",
            "ServiceName": EC2_SERVICE_NAME,
            "QuotaArn": f"arn:aws:servicequotas:{self.region_name}:{self.account_id}:ec2/{quota_code}",
            "QuotaCode": quota_code,
            "QuotaName": EC2_VCPU_QUOTAS[quota_code],
            "Value": value,
            "Unit": "None",
            "Adjustable": True,
            "GlobalQuota": False,
            "QuotaAppliedAtLevel": "ACCOUNT",
        }

    return get


def _reset(original: Callable[..., Any]) -> Callable[..., Any]:
    def reset_all(self: Any) -> None:
        original(self)
        reset()

    return reset_all


def _set_capacity(body: Any) -> None:
    rules = body.get("unavailable") if isinstance(body, dict) else None
    if not isinstance(rules, list):
        raise ValueError('expected {"unavailable": [{"instance_type": ..., "availability_zone": ...}, ...]}')
    checked = []
    for rule in rules:
        keys = set(rule) if isinstance(rule, dict) else set()
        names = keys - {"accepted"}
        if not names or names - {"instance_type", "availability_zone"}:
            raise ValueError(f"{rule!r}: a rule has instance_type, availability_zone or both (and accepted)")
        if not all(isinstance(rule[key], str) and rule[key] for key in names):
            raise ValueError(f"{rule!r}: instance_type and availability_zone are names")
        if not isinstance(rule.get("accepted", False), bool):
            raise ValueError(f"{rule!r}: accepted is true or false")
        checked.append(dict(rule))
    with _lock:
        _unavailable[:] = checked


def _set_quotas(body: Any) -> None:
    quotas = body.get("ec2") if isinstance(body, dict) else None
    if not isinstance(quotas, dict) or set(body) != {"ec2"}:
        raise ValueError('expected {"ec2": {"<quota code>": <vCPUs or null>, ...}}')
    for code, value in quotas.items():
        if code not in EC2_VCPU_QUOTAS:
            known = ", ".join(EC2_VCPU_QUOTAS)
            raise ValueError(f"{code}: not one of the quotas the emulator answers ({known})")
        if value is not None and (isinstance(value, bool) or not isinstance(value, int | float) or value < 0):
            raise ValueError(f"{code}={value!r}: a number of vCPUs, 0 or more, or null")
    with _lock:
        for code, value in quotas.items():
            _quotas["ec2"][code] = DEFAULT_VCPUS if value is None else float(value)


def _state(name: str) -> dict[str, Any]:
    with _lock:
        if name == "capacity":
            return {"unavailable": [dict(rule) for rule in _unavailable]}
        return {service: dict(values) for service, values in _quotas.items()}


# the controls of the other modules (name -> (its state, its setter)), which their apply() registers
CONTROLS: dict[str, tuple[Callable[[], Any], Callable[[Any], None]]] = {}


def control(environ: dict[str, Any], start_response: Any) -> Any:
    """The WSGI answer to /llmfleet-emulator/<name>."""
    request = Request(environ)
    name = request.path[len(PREFIX) :].strip("/")
    controls = {
        "capacity": (lambda: _state("capacity"), _set_capacity),
        "quotas": (lambda: _state("quotas"), _set_quotas),
        **CONTROLS,
    }
    if name not in controls:
        response = Response(json.dumps({"error": f"no control {name!r}"}), 404, mimetype="application/json")
    elif request.method == "GET":
        response = Response(json.dumps(controls[name][0]()), 200, mimetype="application/json")
    elif request.method == "POST":
        try:
            controls[name][1](json.loads(request.get_data(as_text=True) or "null"))
        except ValueError as exc:  # json.JSONDecodeError is one
            response = Response(json.dumps({"error": str(exc)}), 400, mimetype="application/json")
        else:
            response = Response(json.dumps(controls[name][0]()), 200, mimetype="application/json")
    else:
        response = Response(json.dumps({"error": "GET or POST"}), 405, mimetype="application/json")
    return response(environ, start_response)


def _dispatch(original: Callable[..., Any]) -> Callable[..., Any]:
    def call(self: Any, environ: dict[str, Any], start_response: Any) -> Any:
        if str(environ.get("PATH_INFO", "")).startswith(PREFIX):
            return control(environ, start_response)
        return original(self, environ, start_response)

    return call


def apply() -> None:
    backend = ec2_instances.InstanceBackend
    backend.run_instances = _run_instances(backend.run_instances)  # type: ignore[method-assign]
    backend.start_instances = _start_instances(backend.start_instances)  # type: ignore[method-assign]
    backend.describe_instance_attribute = _describe_instance_attribute(backend.describe_instance_attribute)  # type: ignore[method-assign]
    ServiceQuotasBackend.get_service_quota = _get_service_quota(ServiceQuotasBackend.get_service_quota)  # type: ignore[method-assign]
    MotoAPIBackend.reset = _reset(MotoAPIBackend.reset)  # type: ignore[method-assign]
    DomainDispatcherApplication.__call__ = _dispatch(DomainDispatcherApplication.__call__)  # type: ignore[method-assign]
