import { cleanup, render, screen } from "@testing-library/react";
import { afterEach, describe, expect, it } from "vitest";
import { NODES } from "../test/fakeGateway";
import { LatencyChart } from "./LatencyChart";
import { NodesPanel } from "./NodesPanel";

afterEach(cleanup);

describe("LatencyChart", () => {
  it("draws one point per gap and states median and max", () => {
    const { container } = render(<LatencyChart gapsMs={[10, 30, 20, 40]} />);
    const points = container.querySelector("polyline")?.getAttribute("points")?.split(" ");
    expect(points).toHaveLength(4);
    expect(screen.getByRole("img").getAttribute("aria-label")).toBe(
      "Inter-token latency over 4 gaps: median 25.0 ms, max 40.0 ms",
    );
    // the highest gap touches the top (y = padding), the lowest sits lowest
    const ys = points!.map((p) => Number(p.split(",")[1]));
    expect(Math.min(...ys)).toBe(ys[3]);
    expect(Math.max(...ys)).toBe(ys[0]);
  });

  it("waits for a few tokens before drawing", () => {
    render(<LatencyChart gapsMs={[5]} />);
    expect(screen.queryByRole("img")).toBeNull();
  });
});

describe("NodesPanel", () => {
  it("marks a down replica with its reason and unknown KV use", () => {
    const status = structuredClone(NODES);
    status.ready = false;
    status.reason = "stage-2 has no ready replica";
    Object.assign(status.stages[1].replicas[0], {
      up: false,
      reason: "unreachable (ConnectError)",
      kv: null,
      kv_error: "unreachable (ConnectError)",
    });
    render(<NodesPanel state={{ status, error: null, updatedAt: new Date() }} />);
    const down = screen.getByTestId("replica-stage-2");
    expect(down.className).toContain("down");
    expect(down.textContent).toContain("unreachable (ConnectError)");
    expect(down.textContent).toContain("KV cache: unknown");
    expect(screen.getByTestId("gateway-ready").textContent).toContain("not ready");
    expect(screen.getByTestId("replica-stage-1").className).toContain("up");
  });

  it("keeps the last status on screen, marked stale, when the gateway stops answering", () => {
    render(<NodesPanel state={{ status: NODES, error: "cannot reach the gateway", updatedAt: new Date() }} />);
    expect(screen.getByRole("status").textContent).toBe("Node health is stale: cannot reach the gateway");
    expect(screen.getByTestId("node-stage-1")).toBeTruthy();
  });
});
