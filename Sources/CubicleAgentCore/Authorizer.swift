import CubicleJSON

/// CreateAgentRuntime's `authorizerConfiguration.customJWTAuthorizer`, validated as botocore's model has it.
/// A runtime with one is called with `Authorization: Bearer <JWT>` instead of SigV4 (CubicleAuth checks it).
public struct JWTAuthorizerConfiguration: Equatable, Sendable {
    /// `.../.well-known/openid-configuration`: the issuer and its JWKS come from here.
    public var discoveryURL: String
    public var allowedAudience: [String] = []
    public var allowedClients: [String] = []
    public var allowedScopes: [String] = []
    public var customClaims: [CustomClaim] = []

    public struct CustomClaim: Equatable, Sendable {
        public enum ValueType: String, Sendable { case string = "STRING", stringArray = "STRING_ARRAY" }
        public enum Operator: String, Sendable { case equals = "EQUALS", contains = "CONTAINS", containsAny = "CONTAINS_ANY" }
        public var name: String
        public var valueType: ValueType
        public var matchOperator: Operator
        /// `matchValueString` (EQUALS, CONTAINS) or `matchValueStringList` (CONTAINS_ANY).
        public var values: [String]
    }

    public init(discoveryURL: String) { self.discoveryURL = discoveryURL }

    /// From `authorizerConfiguration` (the API's JSON, or the YAML file's same structure).
    public static func parse(_ json: JSON, field: String = "authorizerConfiguration") throws(AgentCoreError) -> JWTAuthorizerConfiguration {
        guard let o = json.objectValue, o.count == 1, let jwt = o["customJWTAuthorizer"]?.objectValue else {
            throw AgentCoreError.invalidField(field, "must be {customJWTAuthorizer: {...}}, the only authorizer AgentCore has")
        }
        let path = "\(field).customJWTAuthorizer"
        guard let url = jwt["discoveryUrl"]?.stringValue else { throw AgentCoreError.invalidField("\(path).discoveryUrl", "Member must not be null") }
        guard url.hasSuffix("/.well-known/openid-configuration"), url.utf8.count > "/.well-known/openid-configuration".utf8.count,
              url.hasPrefix("https://") || url.hasPrefix("http://"), url.utf8.count <= 2048 else {
            throw AgentCoreError.invalidField("\(path).discoveryUrl", "Member must satisfy regular expression pattern: .+/\\.well-known/openid-configuration")
        }
        var c = JWTAuthorizerConfiguration(discoveryURL: url)
        func list(_ key: String) throws(AgentCoreError) -> [String] {
            guard let v = jwt[key] else { return [] }
            guard let items = v.arrayValue, !items.isEmpty, items.count <= 255 else {
                throw AgentCoreError.invalidField("\(path).\(key)", "Member must be a list of 1 to 255 strings")
            }
            var out: [String] = []
            for item in items {
                guard let s = item.stringValue, (1...255).contains(s.utf8.count) else { throw AgentCoreError.invalidField("\(path).\(key)", "Member must be a list of 1 to 255 strings") }
                out.append(s)
            }
            return out
        }
        c.allowedAudience = try list("allowedAudience")
        c.allowedClients = try list("allowedClients")
        c.allowedScopes = try list("allowedScopes")
        if let claims = jwt["customClaims"] {
            guard let items = claims.arrayValue, !items.isEmpty, items.count <= 255 else {
                throw AgentCoreError.invalidField("\(path).customClaims", "Member must be a list of 1 to 255 claim validations")
            }
            for (i, item) in items.enumerated() {
                let p = "\(path).customClaims[\(i)]"
                guard let name = item["inboundTokenClaimName"]?.stringValue, (1...255).contains(name.utf8.count) else {
                    throw AgentCoreError.invalidField("\(p).inboundTokenClaimName", "Member must not be null")
                }
                guard let type = item["inboundTokenClaimValueType"]?.stringValue.flatMap(CustomClaim.ValueType.init(rawValue:)) else {
                    throw AgentCoreError.invalidField("\(p).inboundTokenClaimValueType", "Member must satisfy enum value set: [STRING, STRING_ARRAY]")
                }
                guard let match = item["authorizingClaimMatchValue"],
                      let op = match["claimMatchOperator"]?.stringValue.flatMap(CustomClaim.Operator.init(rawValue:)), let value = match["claimMatchValue"] else {
                    throw AgentCoreError.invalidField("\(p).authorizingClaimMatchValue", "needs claimMatchValue and claimMatchOperator (EQUALS, CONTAINS or CONTAINS_ANY)")
                }
                let values: [String]
                switch (type, op) {
                case (.string, .equals), (.stringArray, .contains):
                    guard let s = value["matchValueString"]?.stringValue, value.objectValue?.count == 1 else {
                        throw AgentCoreError.invalidField("\(p).authorizingClaimMatchValue.claimMatchValue", "\(op.rawValue) on \(type.rawValue) takes matchValueString")
                    }
                    values = [s]
                case (.stringArray, .containsAny):
                    guard let l = value["matchValueStringList"]?.arrayValue, !l.isEmpty, value.objectValue?.count == 1 else {
                        throw AgentCoreError.invalidField("\(p).authorizingClaimMatchValue.claimMatchValue", "CONTAINS_ANY takes matchValueStringList")
                    }
                    var out: [String] = []
                    for v in l { guard let s = v.stringValue else { throw AgentCoreError.invalidField("\(p).authorizingClaimMatchValue.claimMatchValue", "matchValueStringList holds strings") }; out.append(s) }
                    values = out
                default:
                    throw AgentCoreError.invalidField("\(p).authorizingClaimMatchValue.claimMatchOperator", "\(op.rawValue) does not apply to a \(type.rawValue) claim (STRING: EQUALS; STRING_ARRAY: CONTAINS, CONTAINS_ANY)")
                }
                c.customClaims.append(CustomClaim(name: name, valueType: type, matchOperator: op, values: values))
            }
        }
        for key in jwt.keys where !["discoveryUrl", "allowedAudience", "allowedClients", "allowedScopes", "customClaims"].contains(key) {
            throw AgentCoreError.invalidField("\(path).\(key)", key.hasPrefix("privateEndpoint")
                ? "private endpoints are not supported by Cubicle; the issuer is reached from cubicled's host" : "is not a member of CustomJWTAuthorizerConfiguration")
        }
        return c
    }

    /// As the API answers it (GetAgentRuntime) and the store keeps it.
    public var json: JSON {
        var jwt: [String: JSON] = ["discoveryUrl": .string(discoveryURL)]
        if !allowedAudience.isEmpty { jwt["allowedAudience"] = .array(allowedAudience.map(JSON.string)) }
        if !allowedClients.isEmpty { jwt["allowedClients"] = .array(allowedClients.map(JSON.string)) }
        if !allowedScopes.isEmpty { jwt["allowedScopes"] = .array(allowedScopes.map(JSON.string)) }
        if !customClaims.isEmpty {
            jwt["customClaims"] = .array(customClaims.map { c in
                let value: JSON = c.matchOperator == .containsAny ? ["matchValueStringList": .array(c.values.map(JSON.string))] : ["matchValueString": .string(c.values[0])]
                return ["inboundTokenClaimName": .string(c.name), "inboundTokenClaimValueType": .string(c.valueType.rawValue),
                        "authorizingClaimMatchValue": ["claimMatchValue": value, "claimMatchOperator": .string(c.matchOperator.rawValue)]]
            })
        }
        return ["customJWTAuthorizer": .object(jwt)]
    }
}
