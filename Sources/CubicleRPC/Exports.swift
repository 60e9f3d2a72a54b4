// Every RPC message is JSON; users of the protocol get the JSON type with it.
@_exported import CubicleJSON
@_exported import enum CubicleLinux.Hex
