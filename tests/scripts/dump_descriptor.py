"""Print the OIP descriptor (fields and methods) of ours or tritonclient's stubs as JSON.

Run in its own process: both stubs define the package `inference`, and one
process's descriptor pool cannot hold the two.
"""

import json
import sys

from google.protobuf import descriptor_pb2


def main(which: str) -> None:
    if which == "tritonclient":
        from tritonclient.grpc import service_pb2 as module
    else:
        from proto.inference import grpc_service_pb2 as module
    file_proto = descriptor_pb2.FileDescriptorProto()
    module.DESCRIPTOR.CopyToProto(file_proto)
    messages: dict[str, list] = {}

    def walk(types, prefix: str) -> None:
        for message in types:
            name = prefix + message.name
            messages[name] = sorted(
                [f.name, f.number, f.type, f.label, f.type_name.rsplit(".", 1)[-1]] for f in message.field
            )
            walk(message.nested_type, name + ".")

    walk(file_proto.message_type, "")
    services = {
        s.name: sorted([m.name, m.input_type.rsplit(".", 1)[-1], m.output_type.rsplit(".", 1)[-1]] for m in s.method)
        for s in file_proto.service
    }
    print(json.dumps({"package": file_proto.package, "messages": messages, "services": services}))


if __name__ == "__main__":
    main(sys.argv[1])
