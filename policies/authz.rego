# Who may do what at the gateway: role-based access to actions, models, priorities and tokens.
#
# Input (services.gateway.policy.PolicyRequest.to_input):
#   {"subject": str, "tenant": str, "roles": [str], "action": str, "model": str | null,
#    "priority": "high" | "normal" | "low" | null, "max_tokens": int | null}
# Data (policies/data.json), per role:
#   data.meshllm.roles[role] = {"actions": [action | "*"], "models": [glob],
#                               "priorities": [priority], "max_tokens": int}
# Decision (data.meshllm.authz.decision):
#   {"allow": bool, "reasons": [str], "max_tokens": int | null, "priority": str}
#
# A caller holds the union of its roles' permissions; an unknown role grants nothing. A role
# counts for a request when it grants both the action and the model, and the request may use
# the priorities and the highest token limit of the roles that count.
package meshllm.authz

roles := data.meshllm.roles

priority_order := ["high", "normal", "low"]

generating_actions := {"chat.completions", "completions"}

generates if input.action in generating_actions

known_roles contains name if {
	some name in input.roles
	roles[name]
}

action_granted(grant) if "*" in grant.actions

action_granted(grant) if input.action in grant.actions

model_granted(_) if input.model == null

model_granted(grant) if {
	is_string(input.model)
	some pattern in grant.models
	glob.match(pattern, null, input.model)
}

action_roles contains name if {
	some name in known_roles
	action_granted(roles[name])
}

granting_roles contains name if {
	some name in action_roles
	model_granted(roles[name])
}

allowed_priorities contains level if {
	some name in granting_roles
	some level in roles[name].priorities
}

token_limit := max({roles[name].max_tokens | some name in granting_roles}) if {
	count(granting_roles) > 0
}

# The role whose limit applies: the first by name among those with the highest limit.
limit_role := [name | some name in granting_roles; roles[name].max_tokens == token_limit][0]

caller_roles := sprintf("role %s", [input.roles[0]]) if {
	count(input.roles) == 1
} else := sprintf("roles %s", [concat(", ", input.roles)])

# A requested priority; else normal when allowed; else the best one allowed.
default priority := "normal"

priority := input.priority if {
	input.priority != null
} else := "normal" if {
	"normal" in allowed_priorities
} else := [p | some p in priority_order; p in allowed_priorities][0]

# The max_tokens to run with: the requested one, else the limit; null when nothing generates.
default max_tokens := null

max_tokens := input.max_tokens if {
	generates
	input.max_tokens != null
} else := token_limit if generates

deny contains "nothing is allowed without a role" if count(input.roles) == 0

deny contains sprintf("nothing is allowed for unknown %s", [caller_roles]) if {
	count(input.roles) > 0
	count(known_roles) == 0
}

deny contains sprintf("action %s is not allowed for %s", [input.action, caller_roles]) if {
	count(known_roles) > 0
	count(action_roles) == 0
}

deny contains sprintf("model %s is not allowed for %s", [input.model, caller_roles]) if {
	count(action_roles) > 0
	count(granting_roles) == 0
}

deny contains msg if {
	count(granting_roles) > 0
	input.priority != null
	not input.priority in allowed_priorities
	allowed := [p | some p in priority_order; p in allowed_priorities]
	msg := sprintf(
		"priority %v is not allowed for %s (allowed: %s)",
		[input.priority, caller_roles, concat(", ", allowed)],
	)
}

deny contains msg if {
	generates
	is_number(input.max_tokens)
	input.max_tokens > token_limit
	msg := sprintf(
		"max_tokens %v exceeds the limit %v of role %s",
		[input.max_tokens, token_limit, limit_role],
	)
}

decision := {
	"allow": count(deny) == 0,
	"reasons": [msg | some msg in deny],
	"max_tokens": max_tokens,
	"priority": priority,
}
