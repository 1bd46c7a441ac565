// Command kstatus prints what kstatus, the library Flux's health checks use
// (sigs.k8s.io/cli-utils/pkg/kstatus/status), computes for each object of a Kubernetes List read
// as JSON on stdin: one JSON line per object, {"kind", "name", "status", "message"}. Tollgate's
// e2e tests run it on the objects the operator reconciled.
package main

import (
	"encoding/json"
	"fmt"
	"io"
	"os"

	"k8s.io/apimachinery/pkg/apis/meta/v1/unstructured"
	utiljson "k8s.io/apimachinery/pkg/util/json"
	"sigs.k8s.io/cli-utils/pkg/kstatus/status"
)

func main() {
	data, err := io.ReadAll(os.Stdin)
	if err != nil {
		fmt.Fprintf(os.Stderr, "kstatus: read stdin: %v\n", err)
		os.Exit(2)
	}
	// Numbers as the apiserver's clients read them (whole numbers are int64).
	var list map[string]interface{}
	if err := utiljson.Unmarshal(data, &list); err != nil {
		fmt.Fprintf(os.Stderr, "kstatus: stdin is not a JSON List: %v\n", err)
		os.Exit(2)
	}
	items, _ := list["items"].([]interface{})
	out := json.NewEncoder(os.Stdout)
	for _, raw := range items {
		item, ok := raw.(map[string]interface{})
		if !ok {
			fmt.Fprintln(os.Stderr, "kstatus: an item is not an object")
			os.Exit(2)
		}
		object := &unstructured.Unstructured{Object: item}
		result, err := status.Compute(object)
		if err != nil {
			fmt.Fprintf(os.Stderr, "kstatus: %s/%s: %v\n", object.GetKind(), object.GetName(), err)
			os.Exit(1)
		}
		if err := out.Encode(map[string]string{
			"kind":    object.GetKind(),
			"name":    object.GetName(),
			"status":  result.Status.String(),
			"message": result.Message,
		}); err != nil {
			os.Exit(1)
		}
	}
}
