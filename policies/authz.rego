# Who may do what: roles, tenants, resources and actions, with attribute rules.
#
# The one access policy of the platform. The same files run in process (regorus, the
# embedded evaluator) or in an OPA server (shared/policy); the decision is
# data.meshllm.authz.decision.
#
# Input (shared.policy.AccessRequest.to_input):
#   {"subject":  {"id": str, "tenant": str, "roles": [str]},
#    "action":   str,
#    "resource": {"kind": str, "tenant": str, "name": str | null, "version": str | null},
#    "request":  {"priority": "high" | "normal" | "low" | null, "max_tokens": int | null},
#    "context":  {"source_ip": str | null, "time_ns": int | null}}
# A resource of tenant "*" is platform-wide (the policy set, the tenants themselves). Without
# context.time_ns the hour is taken from the evaluator's clock.
#
# Data (policies/data.json), under data.meshllm:
#   roles[role] = {"grants": {kind | "*": [action | "*"]}, "models": [pattern],
#                  "priorities": [priority], "max_tokens": int,
#                  "hours_utc": [[from, to]], "networks": [cidr]}
#   aliases[name] = role          another name of a role (user and batch, the names of the
#                                 first roles, are aliases of analyst and service)
#   tenants[tenant] = {"hours_utc": [[from, to]], "networks": [cidr]}
# A model pattern is a glob on the name ("smollm2-*") or on name and version
# ("smollm2-*:2"). hours_utc and networks are optional; when set, a role counts (a tenant's
# subjects may act) only at those UTC hours ([from, to), wrapping midnight when from > to)
# and from those networks.
#
# Decision:
#   {"allow": bool, "reasons": [str], "granted_by": [role], "max_tokens": int | null,
#    "priority": priority}
# reasons say why a request was denied, or which roles granted it. max_tokens and priority
# are obligations for the generating actions: max_tokens is the requested one, else the
# roles' limit (null for actions that generate nothing); priority is the requested one,
# else normal when allowed, else the best one allowed.
#
# A subject holds the union of its roles; a role counts when it grants the action on the
# resource's kind, in the resource's tenant, for the model, under its attribute rules.
# Unknown roles grant nothing. Only platform-admin, held by that name, acts outside its own
# tenant; a subject of any other role acts only on resources of its tenant.
package meshllm.authz

import rego.v1

resource_actions := {
	"model": {"chat", "complete", "embed", "list"},
	"kb_collection": {"read", "write", "admin"},
	"audit": {"read", "verify"},
	"feedback": {"submit", "read", "erase"},
	"dataset": {"build", "read"},
	"training_job": {"create", "read", "cancel", "promote"},
	"admin": {"manage_keys", "deploy", "manage_policies", "manage_tenants"},
}

generating_actions := {"chat", "complete"}

platform_tenant := "*"

cross_tenant_roles := {"platform-admin"}

priority_order := ["high", "normal", "low"]

default roles := {}

roles := data.meshllm.roles

default aliases := {}

aliases := data.meshllm.aliases

default tenants := {}

tenants := data.meshllm.tenants

held := input.subject.roles

kind := input.resource.kind

action := input.action

# ----------------------------------------------------------------------------- roles

# the held roles that exist, each with the role it names and that role's rules
known := {name: role | some name in held; role := object.get(aliases, name, name); roles[role]}

rules_of := {name: roles[role] | some name, role in known}

known_action if action in resource_actions[kind]

grants_action(rules) if {
	grants := object.get(rules, "grants", {})
	some granted_kind in [kind, "*"]
	some granted in object.get(grants, granted_kind, [])
	granted in {action, "*"}
}

action_roles contains name if {
	known_action
	some name, rules in rules_of
	grants_action(rules)
}

# ---------------------------------------------------------------------------- tenants

resource_tenant := input.resource.tenant if {
	is_string(input.resource.tenant)
	input.resource.tenant != ""
}

own_tenant if {
	resource_tenant == input.subject.tenant
	resource_tenant != platform_tenant
}

scope_roles contains name if {
	some name in action_roles
	own_tenant
}

scope_roles contains name if {
	some name in action_roles
	name in cross_tenant_roles
	known[name] == name
	resource_tenant
}

# ----------------------------------------------------------------------------- models

for_model if kind == "model"

generates if {
	for_model
	action in generating_actions
}

model_name := input.resource.name if {
	for_model
	is_string(input.resource.name)
}

model_version := input.resource.version if is_string(input.resource.version)

model_ref := sprintf("%s:%s", [model_name, model_version]) if {
	model_version
} else := model_name

model_granted(_) if not model_name

model_granted(rules) if {
	some pattern in object.get(rules, "models", [])
	model_matches(split(pattern, ":"))
}

model_matches(parts) if {
	count(parts) == 1
	glob.match(parts[0], null, model_name)
}

model_matches(parts) if {
	count(parts) == 2
	glob.match(parts[0], null, model_name)
	version_matches(parts[1])
}

version_matches(pattern) if pattern == "*"

version_matches(pattern) if glob.match(pattern, null, model_version)

model_roles contains name if {
	some name in scope_roles
	model_granted(rules_of[name])
}

# -------------------------------------------------------------------- attribute rules

now_ns := input.context.time_ns if {
	is_number(input.context.time_ns)
} else := time.now_ns()

hour := time.clock([now_ns, "UTC"])[0]

source_ip := input.context.source_ip if is_string(input.context.source_ip)

within_hours(rules) if object.get(rules, "hours_utc", null) == null

within_hours(rules) if {
	some window in rules.hours_utc
	in_window(window)
}

in_window(window) if {
	window[0] <= window[1]
	window[0] <= hour
	hour < window[1]
}

in_window(window) if {
	window[0] > window[1]
	window[0] <= hour
}

in_window(window) if {
	window[0] > window[1]
	hour < window[1]
}

from_networks(rules) if object.get(rules, "networks", null) == null

from_networks(rules) if {
	some cidr in rules.networks
	net.cidr_contains(cidr, source_ip)
}

granting_roles contains name if {
	some name in model_roles
	within_hours(rules_of[name])
	from_networks(rules_of[name])
}

tenant_rules := object.get(tenants, input.subject.tenant, {})

hours_text(rules) := concat(", ", [sprintf("%v-%v", [w[0], w[1]]) | some w in rules.hours_utc])

networks_text(rules) := concat(", ", rules.networks)

source_text := source_ip if {
	source_ip
} else := "unknown"

# ------------------------------------------------------------------- tokens, priority

role_limits contains limit if {
	some name in granting_roles
	limit := rules_of[name].max_tokens
	is_number(limit)
}

token_limit := max(role_limits) if count(role_limits) > 0

# The role whose limit applies: the first by name among those with the highest limit.
limit_role := [name | some name in granting_roles; rules_of[name].max_tokens == token_limit][0]

allowed_priorities contains level if {
	for_model
	some name in granting_roles
	some level in object.get(rules_of[name], "priorities", [])
}

requested_priority := input.request.priority if input.request.priority != null

default priority := "normal"

priority := requested_priority if {
	for_model
	requested_priority in priority_order
} else := "normal" if {
	"normal" in allowed_priorities
} else := [p | some p in priority_order; p in allowed_priorities][0] if {
	for_model
}

requested_tokens := input.request.max_tokens if is_number(input.request.max_tokens)

default max_tokens := null

max_tokens := requested_tokens if {
	generates
	requested_tokens
} else := token_limit if {
	generates
}

# ---------------------------------------------------------------------------- denials

caller_roles := sprintf("role %s", [held[0]]) if {
	count(held) == 1
} else := sprintf("roles %s", [concat(", ", held)])

deny contains "nothing is allowed without a role" if count(held) == 0

deny contains sprintf("nothing is allowed for unknown %s", [caller_roles]) if {
	count(held) > 0
	count(known) == 0
}

deny contains sprintf("unknown resource kind %v", [kind]) if not resource_actions[kind]

deny contains sprintf("unknown action %v on %v", [action, kind]) if {
	resource_actions[kind]
	not known_action
}

deny contains sprintf("action %s on %s is not allowed for %s", [action, kind, caller_roles]) if {
	known_action
	count(known) > 0
	count(action_roles) == 0
}

deny contains "the resource names no tenant" if not resource_tenant

deny contains msg if {
	count(action_roles) > 0
	count(scope_roles) == 0
	resource_tenant == platform_tenant
	msg := sprintf(
		"tenant %s may not act on platform-wide resources (%s)",
		[input.subject.tenant, caller_roles],
	)
}

deny contains msg if {
	count(action_roles) > 0
	count(scope_roles) == 0
	resource_tenant != platform_tenant
	msg := sprintf(
		"tenant %s may not act on resources of tenant %s (%s)",
		[input.subject.tenant, resource_tenant, caller_roles],
	)
}

deny contains sprintf("model %s is not allowed for %s", [model_ref, caller_roles]) if {
	count(scope_roles) > 0
	count(model_roles) == 0
}

deny contains msg if {
	count(granting_roles) == 0
	some name in model_roles
	not within_hours(rules_of[name])
	msg := sprintf(
		"role %s is allowed only at hours %s UTC (now %v)",
		[name, hours_text(rules_of[name]), hour],
	)
}

deny contains msg if {
	count(granting_roles) == 0
	some name in model_roles
	not from_networks(rules_of[name])
	msg := sprintf(
		"role %s is allowed only from networks %s (source %s)",
		[name, networks_text(rules_of[name]), source_text],
	)
}

deny contains msg if {
	not within_hours(tenant_rules)
	msg := sprintf(
		"tenant %s allows access only at hours %s UTC (now %v)",
		[input.subject.tenant, hours_text(tenant_rules), hour],
	)
}

deny contains msg if {
	not from_networks(tenant_rules)
	msg := sprintf(
		"tenant %s allows access only from networks %s (source %s)",
		[input.subject.tenant, networks_text(tenant_rules), source_text],
	)
}

deny contains msg if {
	count(granting_roles) > 0
	for_model
	requested_priority
	not requested_priority in allowed_priorities
	allowed := [p | some p in priority_order; p in allowed_priorities]
	msg := sprintf(
		"priority %v is not allowed for %s (allowed: %s)",
		[requested_priority, caller_roles, concat(", ", allowed)],
	)
}

deny contains msg if {
	generates
	requested_tokens > token_limit
	msg := sprintf(
		"max_tokens %v exceeds the limit %v of role %s",
		[requested_tokens, token_limit, limit_role],
	)
}

deny contains sprintf("no token limit is set for %s", [caller_roles]) if {
	generates
	count(granting_roles) > 0
	not token_limit
}

# --------------------------------------------------------------------------- decision

allow if {
	count(deny) == 0
	count(granting_roles) > 0
}

default allow := false

grant_reason(name) := sprintf("granted by role %s%s%s", [name, alias_note(name), scope_note])

alias_note(name) := sprintf(" (alias of %s)", [known[name]]) if {
	known[name] != name
} else := ""

scope_note := sprintf(" in tenant %s", [resource_tenant]) if {
	own_tenant
} else := " across tenants"

reasons := [msg | some msg in deny] if {
	count(deny) > 0
} else := [grant_reason(name) | some name in granting_roles] if {
	allow
} else := ["no role grants this request"]

granted_by := [name | some name in granting_roles] if {
	allow
} else := []

decision := {
	"allow": allow,
	"reasons": reasons,
	"granted_by": granted_by,
	"max_tokens": max_tokens,
	"priority": priority,
}
