// Pages live at real paths (/models, /playground, ...): Flask answers every such path with
// index.html, so a reload or a shared link opens the same page.
import { useEffect, useState } from "react";

export function usePath(): [string, (path: string) => void] {
  const [path, setPath] = useState(() => window.location.pathname);
  useEffect(() => {
    const onPop = () => setPath(window.location.pathname);
    window.addEventListener("popstate", onPop);
    return () => window.removeEventListener("popstate", onPop);
  }, []);
  const navigate = (next: string) => {
    if (next !== window.location.pathname) window.history.pushState(null, "", next);
    setPath(next);
  };
  return [path, navigate];
}
