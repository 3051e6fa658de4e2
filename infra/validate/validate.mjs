// node validate.mjs FILE...: every Knative Service (serving.knative.dev/v1, which Cloud Run's
// service YAMLs are too) in the YAML files against the Knative Serving schema of
// @kubernetes-models/knative. Prints one line per resource; exits 1 when any fails.
import { readFileSync } from "node:fs";
import yaml from "js-yaml";
import { Service } from "@kubernetes-models/knative/serving.knative.dev/v1/Service";

let failed = 0;
for (const file of process.argv.slice(2)) {
  for (const doc of yaml.loadAll(readFileSync(file, "utf8"))) {
    if (!doc) continue;
    const what = `${file}: ${doc.kind}/${doc.metadata?.name}`;
    if (doc.apiVersion !== Service.apiVersion || doc.kind !== Service.kind) {
      console.log(`skipped ${what} (${doc.apiVersion}, not a Knative Service)`);
      continue;
    }
    try {
      new Service(doc).validate();
      console.log(`valid ${what}`);
    } catch (err) {
      failed += 1;
      console.log(`INVALID ${what}: ${err.message}`);
    }
  }
}
process.exit(failed ? 1 : 0);
